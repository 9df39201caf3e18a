"""The rounds that open an auction phase, where many points bid at once (``pipeline.clustering.auction``).

A point still ε-happy where the last assignment put it bids for the same clusters again, at most
what keeps it ε-happy there, so once the centroids settle nearly every point wins its old slots in
one pass over the distances and hardly anyone bids one at a time afterwards.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline.clustering.auction_slots import INF, best_outside, best_two, cluster_prices, settle_bids


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
            j1, w1, w2 = best_two(costs[i], price, value)
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
def first_round(costs, eps, hp, ho, ep, free, held, n_held, stay):  # pragma: no cover - compiled
    """Top-1: all points bid at once (a Jacobi round); each cluster keeps its ``cap`` highest bids.

    The same guarantees as one bid per point in turn: a winner pays its bid, so it is ε-happy, and
    the cluster's price (its cheapest slot) never exceeds what a holder paid. Once the centroids
    settle, nearly every point stays where it was and wins here; only the losers (returned, (L,)
    int64 point ids) go on to bid one at a time.
    """
    n = costs.shape[0]
    choice = np.empty(n, np.int64)
    bid = np.empty(n, np.float64)
    _first_bids(costs, cluster_prices(hp, ep, free), eps, stay, choice, bid)
    settle_bids(choice, bid, np.arange(n), hp, ho, free, held, n_held)
    return np.flatnonzero(n_held == 0)


@njit(cache=True)
def stay_round(costs, eps, hp, ho, ep, free, held, n_held, stay):  # pragma: no cover - compiled
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
    price = cluster_prices(hp, ep, free)
    mark = np.zeros(k, np.bool_)
    bid = np.empty((n, kp))
    stayers = np.zeros(n, np.bool_)
    for i in range(n):
        if stay[i, 0] < 0:
            continue
        w_out = best_outside(costs[i], stay[i], price, mark)
        happy = True
        for h in range(kp):
            j = stay[i, h]
            w = -costs[i, j] - price[j]
            happy = happy and w >= w_out - eps
            bid[i, h] = price[j] + (w - w_out) + eps
        stayers[i] = happy
    points = np.flatnonzero(stayers)
    cluster, paid, who = stay[points].reshape(-1), bid[points].reshape(-1), np.repeat(points, kp)
    settle_bids(cluster, paid, who, hp, ho, free, held, n_held)
    return np.flatnonzero(n_held < kp), points.size


@njit(cache=True)
def unhappy(costs, held, price, eps, hurt):  # pragma: no cover - compiled
    """Top-k: whether some point's worst held cluster is more than ε below its best other cluster, by
    net value at the cluster prices. It can happen to a point that lost the cluster it took first
    and kept its other hands (``hurt``: only those are checked), which that cluster may now beat;
    then the phase is not ε-optimal; it happens often in top-8 clusterings, and a phase that is not
    redone can end measurably above the optimum."""
    mark = np.zeros(costs.shape[1], np.bool_)
    for i in np.flatnonzero(hurt):
        worst = INF
        for j in held[i]:
            worst = min(worst, -costs[i, j] - price[j])
        best = best_outside(costs[i], held[i], price, mark)
        # ε-happy up to rounding: a bid makes its point exactly ε-happy, and price + margin + ε can land
        # 1e-17 below (seen: a calibration's phases redone 50 times for that alone)
        if worst < best - eps * (1 + 1e-9) - 1e-12 * (abs(best) + abs(worst)):
            return True
    return False
