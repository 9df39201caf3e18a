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
a phase is redone from its prices, the happy points staying (``unhappy``). Before this, warm-started
top-k steps on tiny data ended up to 1.9 % above the optimum (15 of 108 cases); the last one
(0.05 %) was an extra slot bought far above its cluster's price (capped now, ``take_slot``): 0 of 108.
Measured, same data and start, 20–25 Lloyd iterations: 50k × 128 rows, k 64, top-2: 17.8 → 4.5 s;
50k × 64, k 128, top-8: 8.1 → 7.5 s (104 of its 130 phases were redone).

The opening rounds live in ``pipeline.clustering.auction_rounds``, the slot, row and queue primitives in
``pipeline.clustering.auction_slots``; this module runs the phases. Numba's on-disk cache is keyed on each
function's own file: after editing ``auction_slots.py`` or ``auction_rounds.py`` in a checkout,
delete ``pipeline/clustering/__pycache__/*.nb?`` or the phases here keep the old primitives compiled in.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit

from pipeline.clustering.auction_rounds import first_round, stay_round, unhappy
from pipeline.clustering.auction_slots import (
    INF,
    best_two,
    cluster_prices,
    dummy_bid,
    prefetch_next,
    select,
    start_queue,
    take_slot,
)

_MAX_REPEATS = 50  # top-k: a phase is redone (stayers stay) while it ends with points not ε-happy


@njit(cache=True)
def _evict(old, j, n_points, held, n_held, queue, in_queue, tail):  # pragma: no cover - compiled
    """Free the hand of person ``old`` that held cluster j; queue it to bid again. Returns the new tail."""
    if old < 0:
        return tail
    if old < n_points:
        for h in range(held.shape[1]):
            if held[old, h] == j:
                held[old, h] = -1
                break
        n_held[old] -= 1
    if not in_queue[old]:
        in_queue[old] = True
        queue[tail] = old
        tail = (tail + 1) % queue.shape[0]
    return tail


@njit(cache=True)
def _auction_phase(costs, kp, n_dummies, eps, hp, ho, ep, eo, free, held, n_held, waiting, hurt):  # pragma: no cover
    """One ε-phase, prices kept: the ``waiting`` points and every dummy bid until every hand holds a slot.

    costs: (N, k) float32, waiting: (L,) int64 points with a free hand. Marks in ``hurt`` (N,) bool the
    points that lost a hand while holding another (only those can end the phase not ε-happy:
    ``unhappy``). Returns the number of bids.
    """
    n, k = costs.shape
    queue, tail = start_queue(waiting, n, n_dummies)
    qsize = queue.shape[0]
    in_queue = np.zeros(n + n_dummies, np.bool_)
    in_queue[queue[:tail]] = True
    head = 0
    top_j = np.empty(kp + 1, np.int64)
    top_w = np.empty(kp + 1, np.float64)
    price = cluster_prices(hp, ep, free)
    mark = np.zeros(k, np.bool_)
    flat = costs.reshape(-1)
    bids = 0
    while head != tail:
        person = queue[head]
        head = (head + 1) % qsize
        in_queue[person] = False
        bids += 1
        prefetch_next(flat, queue, head, tail, n, k)
        if person >= n:  # a dummy: only extra slots
            j, old = dummy_bid(person, eps, hp, ep, eo, free, price)
            tail = _evict(old, j, n, held, n_held, queue, in_queue, tail)
            continue
        i = person
        want = kp - n_held[i]
        if want <= 0:
            continue
        got = select(costs[i], held[i], price, want + 1, top_j, top_w, mark)
        w_next = top_w[want] if got > want else -INF
        for s in range(min(want, got)):
            j = top_j[s]
            margin = top_w[s] - w_next if w_next > -INF else 0.0
            old = take_slot(j, i, margin, eps, hp, ho, ep, eo, free, price)
            for h in range(kp):
                if held[i, h] < 0:
                    held[i, h] = j
                    break
            n_held[i] += 1
            tail = _evict(old, j, n, held, n_held, queue, in_queue, tail)
            if 0 <= old < n and n_held[old] > 0:
                hurt[old] = True
    return bids


@njit(cache=True)
def _auction_phase_top1(costs, n_dummies, eps, hp, ho, ep, eo, free, held, waiting):  # pragma: no cover - compiled
    """``_auction_phase`` for one hand per point: the same bids in the same order, about 2× faster.

    With one hand, a person in the queue holds nothing and a person holding a slot is not in the
    queue, so there is nothing to check before a bid or an eviction (fewer random reads); a bidder's
    best and second-best clusters come from plain passes over its row (``best_two``), and the next
    bidder's row is prefetched. Measured on the benchmark's first step (200k × 64, cold prices):
    580 → 270–300 ns per bid, the same assignment and bid count.
    """
    n, k = costs.shape
    queue, tail = start_queue(waiting, n, n_dummies)
    qsize = queue.shape[0]
    head = 0
    price = cluster_prices(hp, ep, free)
    value = np.empty(k)
    flat = costs.reshape(-1)
    bids = 0
    while head != tail:
        person = queue[head]
        head = (head + 1) % qsize
        bids += 1
        prefetch_next(flat, queue, head, tail, n, k)
        if person >= n:  # a dummy: only extra slots
            j, old = dummy_bid(person, eps, hp, ep, eo, free, price)
        else:
            j, w1, w2 = best_two(costs[person], price, value)
            old = take_slot(j, person, w1 - w2 if w2 > -INF else 0.0, eps, hp, ho, ep, eo, free, price)
            held[person, 0] = j
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
    the opening round count as one). A top-k phase still not ε-optimal after its redos warns
    (RuntimeWarning).
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
    free = np.zeros(k, np.int64)  # empty ordinary slots per cluster (none: hp holds the starting prices)
    held = np.empty((n, kp), np.int64)
    n_held = np.empty(n, np.int64)
    bids = 0
    keep = np.full((n, kp), -1, np.int64)  # the last assignment, where points stay while ε-happy
    if start is not None:
        keep[:] = start
    for eps in eps_schedule:
        for _ in range(_MAX_REPEATS + 1):
            # every slot empty, at the price of the cheapest ordinary one: the cluster's price does not move
            hp[:] = cluster_prices(hp, np.full(k, np.inf), free)[:, None]
            free[:] = cap
            ho[:] = -1
            eo[:] = -1
            held[:] = -1
            n_held[:] = 0
            if kp == 1:
                waiting = first_round(costs, float(eps), hp, ho, ep, free, held, n_held, keep[:, 0])
                phase = _auction_phase_top1(costs, n_dummies, float(eps), hp, ho, ep, eo, free, held, waiting)
                bids += n + int(phase)
            else:
                waiting, stayed = stay_round(costs, float(eps), hp, ho, ep, free, held, n_held, keep)
                hurt = np.zeros(n, np.bool_)
                bids += stayed + int(
                    _auction_phase(costs, kp, n_dummies, float(eps), hp, ho, ep, eo, free, held, n_held, waiting, hurt)
                )
            keep[:] = held
            if kp == 1 or not unhappy(costs, held, cluster_prices(hp, ep, free), float(eps), hurt):
                break
        else:
            warnings.warn(
                f"auction: a top-{kp} phase at ε={eps:.3g} still left points not ε-happy after "
                f"{_MAX_REPEATS} redos; this assignment may be above the stated tolerance",
                RuntimeWarning,
                stacklevel=2,
            )
    return held, cluster_prices(hp, ep, free), bids
