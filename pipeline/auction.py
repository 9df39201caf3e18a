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
"""

from __future__ import annotations

import numpy as np
from numba import njit

_INF = np.inf


@njit(cache=True)
def _sift_down(price, owner, j, size):  # pragma: no cover - compiled
    """Restore the min-heap of cluster j after its root changed."""
    pos = 0
    p = price[j, 0]
    o = owner[j, 0]
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
def _select(i, costs, held, n_held, kp, price, want, top_j, top_w):  # pragma: no cover - compiled
    """The ``want`` best clusters not held by point i, by net value, sorted descending. Returns how many."""
    n = 0
    floor = -_INF  # the worst value kept so far once the list is full
    for j in range(costs.shape[1]):
        w = -costs[i, j] - price[j]
        if n == want and w <= floor:
            continue
        if n_held[i] > 0:
            is_held = False
            for h in range(kp):
                if held[i, h] == j:
                    is_held = True
            if is_held:
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
def _auction_phase(costs, kp, n_dummies, eps, hp, ho, ep, eo, held, n_held):  # pragma: no cover - compiled
    """One ε-phase from an empty assignment, prices kept: persons bid until every hand holds a slot.

    costs: (N, k) float32. Returns the number of bids.
    """
    n, k = costs.shape
    cap = hp.shape[1]
    persons = n + n_dummies
    qsize = persons + 1
    queue = np.arange(qsize).astype(np.int64)
    in_queue = np.ones(persons, np.bool_)
    head, tail = 0, persons
    top_j = np.empty(kp + 1, np.int64)
    top_w = np.empty(kp + 1, np.float64)
    price = np.empty(k)  # each cluster's price: its cheapest slot
    for j in range(k):
        price[j] = min(hp[j, 0], ep[j])
    bids = 0
    while head != tail:
        person = queue[head]
        head = (head + 1) % qsize
        in_queue[person] = False
        bids += 1
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
        got = _select(i, costs, held, n_held, kp, price, want + 1, top_j, top_w)
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
    return bids


def auction(
    costs: np.ndarray, *, kp: int, prices: np.ndarray, eps_schedule: list[float]
) -> tuple[np.ndarray, np.ndarray, int]:
    """ε-scaled auction: an exactly balanced assignment within ``persons·ε_last`` of the optimum.

    costs: (N, k) float32 squared distances; prices: (k,) float64 starting prices (a warm start
    from the previous centroids makes the first phase cheap). Each phase starts from an empty
    assignment and the cluster prices the last one ended with. Returns held (N, kp) int64, the
    final cluster prices (k,) float64 and the number of bids.
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
    for eps in eps_schedule:
        hp[:] = hp[:, :1]  # every slot at the cluster's price: the cluster's price does not move
        ho[:] = -1
        eo[:] = -1
        held[:] = -1
        n_held[:] = 0
        bids += int(_auction_phase(costs, kp, n_dummies, float(eps), hp, ho, ep, eo, held, n_held))
    return held, np.minimum(hp[:, 0], ep), bids
