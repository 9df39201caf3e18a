"""Exactly balanced assignment by an ε-scaled forward auction (Bertsekas), compiled with numba.

The problem: each of N points takes ``kp`` distinct clusters out of ``k``, minimising the total
squared distance, and every cluster receives ⌊N·kp/k⌋ or ⌈N·kp/k⌉ slots. It is a transportation
problem, solved as an assignment between *persons* and *objects*:

* a cluster j owns ``cap = ⌊N·kp/k⌋`` ordinary slots (a min-heap keyed by the price paid for each)
  and, when N·kp is not a multiple of k, one *extra* slot;
* a point is ``kp`` hands that must hold distinct clusters;
* ``k − r`` dummy persons (r = N·kp mod k) can take only extra slots, at no cost, so exactly r
  clusters end up with ``cap + 1`` slots, and the auction decides which.

A point bids for its best clusters by net value ``−cost − price``, where a cluster's price is its
cheapest slot; it pays that price plus its margin over the next-best cluster plus ε. A point is
then ε-happy with the cluster at the price it paid, and the cluster's price never exceeds what any
of its holders paid, so at the end every point's clusters are within ε of its best by
``cost + b_j`` with ``b_j`` the final cluster prices: the assignment is within ``persons·ε`` of
the optimum (linear-programming duality), and ``b_j`` is exactly the per-expert bias that makes a
router reproduce it. ε-scaling (a coarse ε first, then ε/θ, keeping the prices) avoids price wars.

Top-1 phases open with a Jacobi round: every point bids at once (in parallel where numba has
threads), each cluster keeps its highest bids, and only the losers bid one at a time. A point
still ε-happy in the cluster it held in the last assignment (``start``: the last Lloyd step, or the
last phase) bids for that cluster again, so once the centroids settle almost nobody moves and a
Lloyd step costs one pass over the distances (200k × 64 benchmark, 20 iterations: late steps need
no bid after the first round; 72–91 bids per point in all over 4 runs, mean 79, against 78–92,
mean 87, without this; the trajectory is chaotic, so single runs vary). With several hands per
point a Jacobi round of every point costs more bids than it saves (measured), so a top-k phase
opens with a round of the *stayers* only: points still ε-happy in all of their last clusters bid
for them at once, everyone else bids one at a time. With several hands a phase can end with a
point not ε-happy (it lost the cluster it took first and kept hands that cluster now beats); such
a phase is redone from its prices, the happy points staying (``_unhappy``). Before this, warm-started
top-k steps on tiny data ended up to 1.9 % above the optimum (15 of 108 cases; 1 of 108 now, 0.05 %).
Measured, same data and start, 20–25 Lloyd iterations: 50k × 128 rows, k 64, top-2: 17.8 → 4.5 s;
50k × 64, k 128, top-8: 8.1 → 7.5 s (104 of its 130 phases were redone).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_INF = np.inf
_MAX_REPEATS = 50  # top-k: a phase is redone (stayers stay) while it ends with points not ε-happy


@intrinsic
def _prefetch(typingctx, flat, index):  # pragma: no cover - compiled
    """Ask the CPU to start loading ``flat[index]`` into its caches (LLVM's prefetch; no effect on results).

    The persons waiting to bid come in no particular order, so each bid's cost row is a cache miss
    in a matrix far larger than the caches (200k × 64 float32 = 51 MB); asking for the next
    bidder's row while this bid is worked out hides most of that wait.
    """
    signature = types.void(flat, index)

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch"
        )
        # read (0), keep in all cache levels (3), data cache (1)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True)
def _sift_down(price, owner, j, size, pos=0):  # pragma: no cover - compiled
    """Restore the min-heap of cluster j below ``pos`` after the entry at ``pos`` changed."""
    p = price[j, pos]
    o = owner[j, pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and price[j, child + 1] < price[j, child]:
            child += 1
        if price[j, child] >= p:
            break
        price[j, pos] = price[j, child]
        owner[j, pos] = owner[j, child]
        pos = child
    price[j, pos] = p
    owner[j, pos] = o


@njit(cache=True)
def _select(row, held_row, price, want, top_j, top_w, mark):  # pragma: no cover - compiled
    """The ``want`` best clusters not in ``held_row``, by net value, sorted descending. Returns how many.

    row: (k,) float32 costs of the point, held_row: (kp,) int64 its clusters (−1: a free hand),
    mark: (k,) bool scratch, all False (and left so): the held clusters are marked once instead of
    searched for at every cluster (measured with the prefetch below: top-2 and top-8 bids 1.2× faster).
    """
    for h in range(held_row.shape[0]):
        if held_row[h] >= 0:
            mark[held_row[h]] = True
    n = 0
    floor = -_INF  # the worst value kept so far once the list is full
    for j in range(row.shape[0]):
        w = -row[j] - price[j]
        if n == want and w <= floor:
            continue
        if mark[j]:
            continue
        if n < want:
            pos = n
            n += 1
        else:
            pos = want - 1
        while pos > 0 and top_w[pos - 1] < w:
            top_w[pos] = top_w[pos - 1]
            top_j[pos] = top_j[pos - 1]
            pos -= 1
        top_w[pos] = w
        top_j[pos] = j
        if n == want:
            floor = top_w[want - 1]
    for h in range(held_row.shape[0]):
        if held_row[h] >= 0:
            mark[held_row[h]] = False
    return n


@njit(cache=True)
def _evict(old, j, n_points, held, n_held, kp, queue, in_queue, tail, qsize):  # pragma: no cover - compiled
    """Free the hand of person ``old`` that held cluster j; queue it to bid again. Returns the new tail."""
    if old < 0:
        return tail
    if old < n_points:
        for h in range(kp):
            if held[old, h] == j:
                held[old, h] = -1
                break
        n_held[old] -= 1
    if not in_queue[old]:
        in_queue[old] = True
        queue[tail] = old
        tail = (tail + 1) % qsize
    return tail


@njit(cache=True)
def _max(value, skip):  # pragma: no cover - compiled
    """The largest of ``value`` (k,) float64 leaving out index ``skip`` (−1: none), −inf if none.

    Four independent running maxima: a single one is a chain of dependent comparisons that the
    compiler may not reorder (NaN rules), 1.35× slower here; max is exact in any order.
    """
    m0 = m1 = m2 = m3 = -_INF
    k = value.shape[0]
    j = 0
    while j + 4 <= k:
        m0 = max(m0, value[j] if j != skip else -_INF)
        m1 = max(m1, value[j + 1] if j + 1 != skip else -_INF)
        m2 = max(m2, value[j + 2] if j + 2 != skip else -_INF)
        m3 = max(m3, value[j + 3] if j + 3 != skip else -_INF)
        j += 4
    while j < k:
        m0 = max(m0, value[j] if j != skip else -_INF)
        j += 1
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True)
def _best_two(row, price, value):  # pragma: no cover - compiled
    """Point's best cluster by net value ``−cost − price`` (the first, on ties), that value, and the
    best value of any other cluster. row: (k,) float32 costs, value: (k,) float64 scratch.

    Branch-free passes over the row: 1.45× faster than one pass that keeps the top two sorted."""
    k = row.shape[0]
    for j in range(k):
        value[j] = -row[j] - price[j]
    w1 = _max(value, -1)
    j1 = 0
    while value[j1] != w1:
        j1 += 1
    return j1, w1, _max(value, j1)


@njit(cache=True, parallel=True)
def _first_bids(costs, price, eps, stay, choice, bid):  # pragma: no cover - compiled
    """Top-1: what every point bids in the first round, all at once (rows are independent: parallel).

    costs: (N, k) float32, price: (k,) float64, stay: (N,) int64 each point's cluster in the last
    assignment (−1: none) → choice (N,) int64, bid (N,) float64. A point still ε-happy in its last
    cluster bids for it again, at most what keeps it ε-happy there; any other point bids for its
    best cluster, that cluster's price plus its margin over the second best plus ε (a forward bid).
    """
    n, k = costs.shape
    chunks = 64
    for chunk in prange(chunks):
        value = np.empty(k)
        for i in range(chunk * n // chunks, (chunk + 1) * n // chunks):
            j1, w1, w2 = _best_two(costs[i], price, value)
            j0 = stay[i]
            if j0 >= 0 and j0 != j1:
                w0 = -costs[i, j0] - price[j0]
                if w0 >= w1 - eps:
                    choice[i] = j0
                    bid[i] = price[j0] + (w0 - w1) + eps
                    continue
            choice[i] = j1
            bid[i] = price[j1] + (w1 - w2) + eps


@njit(cache=True)
def _first_round(costs, eps, hp, ho, ep, held, n_held, stay):  # pragma: no cover - compiled
    """Top-1: all points bid at once (a Jacobi round); each cluster keeps its ``cap`` highest bids.

    The same guarantees as one bid per point in turn: a winner pays its bid, so it is ε-happy, and
    the cluster's price (its cheapest slot) never exceeds what a holder paid. Once the centroids
    settle, nearly every point stays where it was and wins here; only the losers (returned, (L,)
    int64 point ids) go on to bid one at a time.
    """
    n, k = costs.shape
    cap = hp.shape[1]
    price = np.empty(k)
    for j in range(k):
        price[j] = min(hp[j, 0], ep[j])
    choice = np.empty(n, np.int64)
    bid = np.empty(n, np.float64)
    _first_bids(costs, price, eps, stay, choice, bid)
    start = np.zeros(k + 1, np.int64)
    for i in range(n):
        start[choice[i] + 1] += 1
    for j in range(k):
        start[j + 1] += start[j]
    fill = start[:k].copy()
    by_cluster = np.empty(n, np.int64)  # point ids grouped by the cluster they bid for
    for i in range(n):
        by_cluster[fill[choice[i]]] = i
        fill[choice[i]] += 1
    for j in range(k):
        seg = by_cluster[start[j] : start[j + 1]]
        if seg.size > cap:
            seg = seg[np.argsort(-bid[seg], kind="mergesort")[:cap]]
        for t in range(seg.size):
            hp[j, t] = bid[seg[t]]
            ho[j, t] = seg[t]
            held[seg[t], 0] = j
            n_held[seg[t]] = 1
        for pos in range(cap // 2 - 1, -1, -1):
            _sift_down(hp, ho, j, cap, pos)
    return np.flatnonzero(n_held == 0)


@njit(cache=True)
def _stay_round(costs, eps, hp, ho, ep, held, n_held, stay):  # pragma: no cover - compiled
    """Top-k: every point still ε-happy in all of its last clusters bids for them again, all at once;
    each cluster keeps its ``cap`` highest bids.

    stay: (N, kp) int64 the last assignment (−1: none). A point is ε-happy there when each of its
    clusters is within ε of the best other cluster by net value; it bids, for each, the price plus
    that cluster's margin over the best other cluster plus ε, so a winner is ε-happy at what it
    pays (the guarantee of one bid per point in turn). The other points, and the hands a stayer lost,
    bid one at a time afterwards. Returns the points with a free hand, (L,) int64, and the number
    of points that bid here.
    """
    n, k = costs.shape
    kp = stay.shape[1]
    cap = hp.shape[1]
    price = np.minimum(hp[:, 0], ep)  # each cluster's price: its cheapest slot
    mark = np.zeros(k, np.bool_)
    bid = np.empty((n, kp))
    start = np.zeros(k + 1, np.int64)
    stayers = np.zeros(n, np.bool_)
    for i in range(n):
        if stay[i, 0] < 0:
            continue
        for h in range(kp):
            mark[stay[i, h]] = True
        w_out = -_INF
        for j in range(k):
            if not mark[j]:
                w_out = max(w_out, -costs[i, j] - price[j])
        happy = True
        for h in range(kp):
            j = stay[i, h]
            mark[j] = False
            w = -costs[i, j] - price[j]
            happy = happy and w >= w_out - eps
            bid[i, h] = price[j] + (w - w_out) + eps
        if happy:
            stayers[i] = True
            for h in range(kp):
                start[stay[i, h] + 1] += 1
    for j in range(k):
        start[j + 1] += start[j]
    fill = start[:k].copy()
    pairs = np.empty(start[k], np.int64)  # (point · kp + hand) grouped by the cluster bid for
    for i in range(n):
        if stayers[i]:
            for h in range(kp):
                j = stay[i, h]
                pairs[fill[j]] = i * kp + h
                fill[j] += 1
    flat_bid = bid.reshape(-1)
    for j in range(k):
        seg = pairs[start[j] : start[j + 1]]
        if seg.size > cap:
            seg = seg[np.argsort(-flat_bid[seg], kind="mergesort")[:cap]]
        for t in range(seg.size):
            i = seg[t] // kp
            hp[j, t] = flat_bid[seg[t]]
            ho[j, t] = i
            held[i, n_held[i]] = j
            n_held[i] += 1
        for pos in range(cap // 2 - 1, -1, -1):
            _sift_down(hp, ho, j, cap, pos)
    return np.flatnonzero(n_held < kp), int(stayers.sum())


@njit(cache=True)
def _unhappy(costs, held, price, eps, hurt):  # pragma: no cover - compiled
    """Top-k: whether some point's worst held cluster is more than ε below its best other cluster, by
    net value at the cluster prices. It can happen to a point that lost the cluster it took first
    and kept its other hands (``hurt``: only those are checked), which that cluster may now beat;
    then the phase is not ε-optimal. Measured: in 104 of 130 phases of a top-8 clustering (50k
    rows, k 128), and up to 1.9 % above the optimum on tiny data before phases were redone."""
    k = costs.shape[1]
    kp = held.shape[1]
    mark = np.zeros(k, np.bool_)
    for i in np.flatnonzero(hurt):
        worst = _INF
        for h in range(kp):
            j = held[i, h]
            mark[j] = True
            worst = min(worst, -costs[i, j] - price[j])
        best = -_INF
        for j in range(k):
            if not mark[j]:
                best = max(best, -costs[i, j] - price[j])
        for h in range(kp):
            mark[held[i, h]] = False
        if worst < best - eps:
            return True
    return False


@njit(cache=True)
def _auction_phase(costs, kp, n_dummies, eps, hp, ho, ep, eo, held, n_held, waiting, hurt):  # pragma: no cover
    """One ε-phase, prices kept: the ``waiting`` points and every dummy bid until every hand holds a slot.

    costs: (N, k) float32, waiting: (L,) int64 points with a free hand. Marks in ``hurt`` (N,) bool the
    points that lost a hand while holding another (only those can end the phase not ε-happy:
    ``_unhappy``). Returns the number of bids.
    """
    n, k = costs.shape
    cap = hp.shape[1]
    persons = n + n_dummies
    qsize = persons + 1
    queue = np.empty(qsize, np.int64)
    in_queue = np.zeros(persons, np.bool_)
    tail = 0
    for i in waiting:
        queue[tail] = i
        in_queue[i] = True
        tail += 1
    for d in range(n, persons):
        queue[tail] = d
        in_queue[d] = True
        tail += 1
    head = 0
    top_j = np.empty(kp + 1, np.int64)
    top_w = np.empty(kp + 1, np.float64)
    price = np.empty(k)  # each cluster's price: its cheapest slot
    for j in range(k):
        price[j] = min(hp[j, 0], ep[j])
    mark = np.zeros(k, np.bool_)
    flat = costs.reshape(-1)
    bids = 0
    while head != tail:
        person = queue[head]
        head = (head + 1) % qsize
        in_queue[person] = False
        bids += 1
        if head != tail and queue[head] < n:
            for t in range(0, k, 16):  # 16 float32 = one 64-byte cache line
                _prefetch(flat, queue[head] * k + t)
        if person >= n:  # a dummy: only extra slots, all worth 0 to it
            j1, w1, w2 = -1, -_INF, -_INF
            for j in range(k):
                w = -ep[j]
                if w > w1:
                    j1, w2, w1 = j, w1, w
                elif w > w2:
                    w2 = w
            old = eo[j1]
            ep[j1] = ep[j1] + (w1 - w2 if w2 > -_INF else 0.0) + eps
            eo[j1] = person
            price[j1] = min(hp[j1, 0], ep[j1])
            tail = _evict(old, j1, n, held, n_held, kp, queue, in_queue, tail, qsize)
            continue
        i = person
        want = kp - n_held[i]
        if want <= 0:
            continue
        got = _select(costs[i], held[i], price, want + 1, top_j, top_w, mark)
        w_next = top_w[want] if got > want else -_INF
        for s in range(min(want, got)):
            j = top_j[s]
            margin = top_w[s] - w_next if w_next > -_INF else 0.0
            if ep[j] < hp[j, 0]:  # the extra slot is the cheapest
                old = eo[j]
                ep[j] = ep[j] + margin + eps
                eo[j] = i
            else:
                old = ho[j, 0]
                hp[j, 0] = hp[j, 0] + margin + eps
                ho[j, 0] = i
                _sift_down(hp, ho, j, cap)
            price[j] = min(hp[j, 0], ep[j])
            for h in range(kp):
                if held[i, h] < 0:
                    held[i, h] = j
                    break
            n_held[i] += 1
            tail = _evict(old, j, n, held, n_held, kp, queue, in_queue, tail, qsize)
            if 0 <= old < n and n_held[old] > 0:
                hurt[old] = True
    return bids


@njit(cache=True)
def _auction_phase_top1(costs, n_dummies, eps, hp, ho, ep, eo, held, waiting):  # pragma: no cover - compiled
    """``_auction_phase`` for one hand per point: the same bids in the same order, about 2× faster.

    With one hand, a person in the queue holds nothing and a person holding a slot is not in the
    queue, so there is nothing to check before a bid or an eviction (fewer random reads); a bidder's
    best and second-best clusters come from plain passes over its row (``_best_two``), and the next
    bidder's row is prefetched. Measured on the benchmark's first step (200k × 64, cold prices):
    580 → 270–300 ns per bid, the same assignment and bid count.
    """
    n, k = costs.shape
    cap = hp.shape[1]
    qsize = n + n_dummies + 1
    queue = np.empty(qsize, np.int64)
    tail = 0
    for i in waiting:
        queue[tail] = i
        tail += 1
    for d in range(n, n + n_dummies):
        queue[tail] = d
        tail += 1
    head = 0
    price = np.empty(k)  # each cluster's price: its cheapest slot
    for j in range(k):
        price[j] = min(hp[j, 0], ep[j])
    value = np.empty(k)
    flat = costs.reshape(-1)
    bids = 0
    while head != tail:
        person = queue[head]
        head = (head + 1) % qsize
        bids += 1
        if head != tail and queue[head] < n:
            for t in range(0, k, 16):  # 16 float32 = one 64-byte cache line
                _prefetch(flat, queue[head] * k + t)
        if person >= n:  # a dummy: only extra slots, all worth 0 to it
            j, w1, w2 = -1, -_INF, -_INF
            for t in range(k):
                w = -ep[t]
                if w > w1:
                    j, w2, w1 = t, w1, w
                elif w > w2:
                    w2 = w
            old = eo[j]
            ep[j] = ep[j] + (w1 - w2 if w2 > -_INF else 0.0) + eps
            eo[j] = person
        else:
            j, w1, w2 = _best_two(costs[person], price, value)
            margin = w1 - w2 if w2 > -_INF else 0.0
            if ep[j] < hp[j, 0]:  # the extra slot is the cheapest
                old = eo[j]
                ep[j] = ep[j] + margin + eps
                eo[j] = person
            else:
                old = ho[j, 0]
                hp[j, 0] = hp[j, 0] + margin + eps
                ho[j, 0] = person
                _sift_down(hp, ho, j, cap)
            held[person, 0] = j
        price[j] = min(hp[j, 0], ep[j])
        if old >= 0:
            if old < n:
                held[old, 0] = -1
            queue[tail] = old
            tail = (tail + 1) % qsize
    return bids


def auction(
    costs: np.ndarray,
    *,
    kp: int,
    prices: np.ndarray,
    eps_schedule: list[float],
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """ε-scaled auction: an exactly balanced assignment within ``persons·ε_last`` of the optimum.

    costs: (N, k) float32 squared distances; prices: (k,) float64 starting prices (a warm start
    from the previous centroids makes the first phase cheap); start: (N, kp) int64 the last
    assignment, or None (points still ε-happy there keep their clusters). Each phase
    starts from an empty assignment and the cluster prices the last one ended with. Returns held
    (N, kp) int64, the final cluster prices (k,) float64 and the number of bids (a point's bids in
    the opening round count as one).
    """
    n, k = costs.shape
    cap, extra = divmod(n * kp, k)
    if cap < 1 or kp >= k:
        raise ValueError(f"{n} points × {kp} cannot fill {k} clusters")
    n_dummies = k - extra if extra else 0
    hp = np.repeat(np.asarray(prices, np.float64)[:, None], cap, axis=1)
    ho = np.empty((k, cap), np.int64)
    ep = np.asarray(prices, np.float64).copy() if extra else np.full(k, np.inf)
    eo = np.empty(k, np.int64)
    held = np.empty((n, kp), np.int64)
    n_held = np.empty(n, np.int64)
    bids = 0
    keep = np.full((n, kp), -1, np.int64)  # the last assignment, where points stay while ε-happy
    if start is not None:
        keep[:] = start
    for eps in eps_schedule:
        for _ in range(_MAX_REPEATS + 1):
            hp[:] = hp[:, :1]  # every slot at the cluster's price: the cluster's price does not move
            ho[:] = -1
            eo[:] = -1
            held[:] = -1
            n_held[:] = 0
            if kp == 1:
                waiting = _first_round(costs, float(eps), hp, ho, ep, held, n_held, keep[:, 0])
                bids += n + int(_auction_phase_top1(costs, n_dummies, float(eps), hp, ho, ep, eo, held, waiting))
            else:
                waiting, stayed = _stay_round(costs, float(eps), hp, ho, ep, held, n_held, keep)
                hurt = np.zeros(n, np.bool_)
                bids += stayed + int(
                    _auction_phase(costs, kp, n_dummies, float(eps), hp, ho, ep, eo, held, n_held, waiting, hurt)
                )
            keep[:] = held
            if kp == 1 or not _unhappy(costs, held, np.minimum(hp[:, 0], ep), float(eps), hurt):
                break
    return held, np.minimum(hp[:, 0], ep), bids
