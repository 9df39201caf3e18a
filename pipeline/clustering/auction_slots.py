"""Compiled primitives of the auction (``pipeline.clustering.auction``): a cluster's slots, a point's row, the queue.

A cluster j owns ``cap`` ordinary slots, the prices paid for them in ``hp`` (k, cap) float64 and
their owners in ``ho`` (k, cap) int64 (−1: empty), and one extra slot (``ep`` (k,), owner ``eo``;
``ep = inf`` when there are no extra slots). Its price is its cheapest slot. While ``free[j]`` > 0 of
its ordinary slots are empty, the filled ones are ``hp[j, :cap − free[j]]`` in no order and the empty
ones, after them, hold the cluster's price at the phase start (the cheapest: no heap is needed); once
the last one is taken the row is made a min-heap, and a bid for a full cluster replaces its root. At
Qwen3-30B-A3B's shape (262,144 points, 128 clusters, top-8: 16,384 slots a cluster) most slots of a
phase are taken while empty, and a heap insertion there is ~14 random reads in a 16 MB array.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

INF = np.inf


@intrinsic
def _prefetch(typingctx, flat, index):  # pragma: no cover - compiled
    """Ask the CPU to start loading ``flat[index]`` into its caches (LLVM's prefetch; no effect on results)."""
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
def prefetch_next(flat, queue, head, tail, n, k):  # pragma: no cover - compiled
    """Start loading the cost row of the next point in the queue (flat: the (N·k,) cost matrix).

    The persons waiting to bid come in no particular order, so each bid's cost row is a cache miss
    in a matrix far larger than the caches (200k × 64 float32 = 51 MB); asking for the next
    bidder's row while this bid is worked out hides most of that wait.
    """
    if head != tail and queue[head] < n:
        for t in range(0, k, 16):  # 16 float32 = one 64-byte cache line
            _prefetch(flat, queue[head] * k + t)


@njit(cache=True)
def start_queue(waiting, n, n_dummies):  # pragma: no cover - compiled
    """A ring buffer holding the ``waiting`` points, then every dummy (ids n … n + n_dummies − 1).
    Returns (queue (n + n_dummies + 1,) int64, tail)."""
    queue = np.empty(n + n_dummies + 1, np.int64)
    tail = 0
    for i in waiting:
        queue[tail] = i
        tail += 1
    for d in range(n, n + n_dummies):
        queue[tail] = d
        tail += 1
    return queue, tail


@njit(cache=True)
def cheapest(hp, free, j):  # pragma: no cover - compiled
    """The price of cluster j's cheapest ordinary slot (an empty one while there is one)."""
    f = free[j]
    return hp[j, hp.shape[1] - f] if f > 0 else hp[j, 0]


@njit(cache=True)
def cluster_prices(hp, ep, free):  # pragma: no cover - compiled
    """(k,) each cluster's price: its cheapest slot."""
    price = np.empty(hp.shape[0])
    for j in range(hp.shape[0]):
        price[j] = min(cheapest(hp, free, j), ep[j])
    return price


@njit(cache=True)
def heapify(hp, ho, j):  # pragma: no cover - compiled
    """Make cluster j's slots a min-heap (once all are filled)."""
    cap = hp.shape[1]
    for pos in range(cap // 2 - 1, -1, -1):
        sift_down(hp, ho, j, cap, pos)


@njit(cache=True)
def sift_down(price, owner, j, size, pos=0):  # pragma: no cover - compiled
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
def take_slot(j, person, margin, eps, hp, ho, ep, eo, free, price):  # pragma: no cover - compiled
    """``person`` takes cluster j's cheapest slot, raising its price by its margin plus ε, and sets
    ``price[j]`` (the caller's (k,) cluster prices) to the cluster's new cheapest slot. Returns the
    slot's previous owner (−1: none).

    Taking the extra slot, a bid pays at most the cluster's cheapest ordinary slot plus ε (the next
    slot of the same cluster, as in a textbook auction, where the second-best object may be another
    slot of the best cluster). Without this cap a point could pay far more for the extra slot than
    the cluster's price, so the clusters that end with ⌈N·kp/k⌉ slots need not be the dearest, and
    the assignment could miss the optimum by more than the ε bound (measured: 0.05 % on tiny data).
    """
    ordinary = cheapest(hp, free, j)
    if ep[j] < ordinary:  # the extra slot is the cheapest
        old = eo[j]
        ep[j] = min(ep[j] + margin + eps, ordinary + eps)
        eo[j] = person
    elif free[j] > 0:  # an empty slot: no heap yet
        pos = hp.shape[1] - free[j]
        old = -1
        hp[j, pos] = ordinary + margin + eps
        ho[j, pos] = person
        free[j] -= 1
        if free[j] == 0:
            heapify(hp, ho, j)
    else:
        old = ho[j, 0]
        hp[j, 0] = hp[j, 0] + margin + eps
        ho[j, 0] = person
        sift_down(hp, ho, j, hp.shape[1])
    price[j] = min(cheapest(hp, free, j), ep[j])
    return old


@njit(cache=True)
def dummy_bid(person, eps, hp, ep, eo, free, price):  # pragma: no cover - compiled
    """A dummy takes the cheapest extra slot (all are worth 0 to it), paying its margin over the
    second cheapest plus ε; ``price`` as in ``take_slot``. Returns (the cluster, the slot's previous owner)."""
    j1, w1, w2 = -1, -INF, -INF
    for j in range(ep.shape[0]):
        w = -ep[j]
        if w > w1:
            j1, w2, w1 = j, w1, w
        elif w > w2:
            w2 = w
    old = eo[j1]
    ep[j1] = ep[j1] + (w1 - w2 if w2 > -INF else 0.0) + eps
    eo[j1] = person
    price[j1] = min(cheapest(hp, free, j1), ep[j1])
    return j1, old


@njit(cache=True)
def settle_bids(cluster, bid, point, hp, ho, free, held, n_held):  # pragma: no cover - compiled
    """Bids made all at once (a Jacobi round) into empty clusters: each keeps its ``cap`` highest,
    whose points take its first ordinary slots at what they bid (appended to their ``held`` row);
    a cluster filled up is made a heap, the others keep their empty slots last (``free``).

    cluster, bid, point: (M,) one entry per bid."""
    k, cap = hp.shape
    start = np.zeros(k + 1, np.int64)
    for m in range(cluster.shape[0]):
        start[cluster[m] + 1] += 1
    for j in range(k):
        start[j + 1] += start[j]
    fill = start[:k].copy()
    by_cluster = np.empty(cluster.shape[0], np.int64)  # bid ids grouped by the cluster bid for
    for m in range(cluster.shape[0]):
        by_cluster[fill[cluster[m]]] = m
        fill[cluster[m]] += 1
    for j in range(k):
        seg = by_cluster[start[j] : start[j + 1]]
        if seg.size > cap:
            seg = seg[np.argsort(-bid[seg], kind="mergesort")[:cap]]
        for t in range(seg.size):
            i = point[seg[t]]
            hp[j, t] = bid[seg[t]]
            ho[j, t] = i
            held[i, n_held[i]] = j
            n_held[i] += 1
        free[j] = cap - seg.size
        if free[j] == 0:
            heapify(hp, ho, j)


@njit(cache=True)
def best_outside(row, held_row, price, mark):  # pragma: no cover - compiled
    """The best net value ``−cost − price`` of any cluster not in ``held_row`` (−inf if none).

    row: (k,) float32 costs of the point, held_row: (kp,) int64 its clusters (all held), mark: (k,)
    bool scratch, all False (and left so)."""
    for h in range(held_row.shape[0]):
        mark[held_row[h]] = True
    best = -INF
    for j in range(row.shape[0]):
        if not mark[j]:
            best = max(best, -row[j] - price[j])
    for h in range(held_row.shape[0]):
        mark[held_row[h]] = False
    return best


@njit(cache=True)
def select(row, held_row, price, want, top_j, top_w, mark):  # pragma: no cover - compiled
    """The ``want`` best clusters not in ``held_row``, by net value, sorted descending. Returns how many.

    row: (k,) float32 costs of the point, held_row: (kp,) int64 its clusters (−1: a free hand),
    mark: (k,) bool scratch, all False (and left so): the held clusters are marked once instead of
    searched for at every cluster (measured with the prefetch: top-2 and top-8 bids 1.2× faster).
    """
    for h in range(held_row.shape[0]):
        if held_row[h] >= 0:
            mark[held_row[h]] = True
    n = 0
    floor = -INF  # the worst value kept so far once the list is full
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
def _max(value, skip):  # pragma: no cover - compiled
    """The largest of ``value`` (k,) float64 leaving out index ``skip`` (−1: none), −inf if none.

    Four independent running maxima: a single one is a chain of dependent comparisons that the
    compiler may not reorder (NaN rules), 1.35× slower here; max is exact in any order.
    """
    m0 = m1 = m2 = m3 = -INF
    k = value.shape[0]
    j = 0
    while j + 4 <= k:
        m0 = max(m0, value[j] if j != skip else -INF)
        m1 = max(m1, value[j + 1] if j + 1 != skip else -INF)
        m2 = max(m2, value[j + 2] if j + 2 != skip else -INF)
        m3 = max(m3, value[j + 3] if j + 3 != skip else -INF)
        j += 4
    while j < k:
        m0 = max(m0, value[j] if j != skip else -INF)
        j += 1
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True)
def best_two(row, price, value):  # pragma: no cover - compiled
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
