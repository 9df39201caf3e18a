"""Balanced k-means: exact sizes, optimal assignments (against exact solvers on tiny data), prices, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, linprog

from pipeline.clustering.kmeans import BalancedAssigner, balanced_assign, balanced_kmeans, update_centroids
from pipeline.errors import LprError


def _points(n: int, d: int, seed: int) -> np.ndarray:
    """A skewed mixture: half the points crowd around one spot, so balance has a real price."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[: n // 2] = x[: n // 2] * 0.3 + 2.0
    return x


def _costs(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


def exact_top1_cost(cost: np.ndarray) -> float:
    """Optimal balanced top-1 cost: Hungarian on clusters replicated ⌊N/k⌋ times, plus one extra
    slot per cluster that k − r zero-cost dummies fill, so exactly r = N mod k clusters get ⌈N/k⌉."""
    n, k = cost.shape
    floor, r = divmod(n, k)
    regular = np.repeat(np.arange(k), floor)
    if r == 0:
        rows, cols = linear_sum_assignment(cost[:, regular])
        return float(cost[:, regular][rows, cols].sum())
    big = 1e12
    matrix = np.zeros((n + k - r, k * floor + k))
    matrix[:n, : k * floor] = cost[:, regular]
    matrix[:n, k * floor :] = cost
    matrix[n:, : k * floor] = big
    rows, cols = linear_sum_assignment(matrix)
    return float(matrix[rows, cols][rows < n].sum())


def _balanced_lp(cost: np.ndarray, kp: int):
    """The balanced top-k assignment as a linear programme (its constraint matrix is totally unimodular,
    so the optimum is integral): each point takes kp clusters, each cluster ⌊N·kp/k⌋ or ⌈N·kp/k⌉ slots."""
    n, k = cost.shape
    floor, r = divmod(n * kp, k)
    a_rows = np.zeros((n, n * k))
    for i in range(n):
        a_rows[i, i * k : (i + 1) * k] = 1
    a_cols = np.zeros((k, n * k))
    for j in range(k):
        a_cols[j, j::k] = 1
    upper = floor + (1 if r else 0)
    result = linprog(
        cost.reshape(-1),
        A_ub=np.vstack([a_cols, -a_cols]),
        b_ub=np.concatenate([np.full(k, upper), np.full(k, -floor)]),
        A_eq=a_rows,
        b_eq=np.full(n, kp),
        bounds=(0, 1),
        method="highs",
    )
    assert result.status == 0
    return result


def exact_topk_cost(cost: np.ndarray, kp: int) -> float:
    """Optimal balanced top-k cost."""
    return float(_balanced_lp(cost, kp).fun)


def exact_topk_assignment(cost: np.ndarray, kp: int) -> np.ndarray:
    """An optimal balanced assignment (N, kp) int64."""
    chosen = _balanced_lp(cost, kp).x.reshape(cost.shape) > 0.5
    assert (chosen.sum(axis=1) == kp).all()
    return np.nonzero(chosen)[1].reshape(-1, kp).astype(np.int64)


@pytest.mark.parametrize("seed", range(8))
def test_top1_assignment_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(30, 90)), int(rng.integers(2, 9))
    x = _points(n, 3, seed)
    centroids = x[rng.choice(n, k, replace=False)]
    held, costs, _prices = balanced_assign(x, centroids, tol=1e-6)
    sizes = np.bincount(held[:, 0], minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    optimum = exact_top1_cost(_costs(x, centroids))
    assert costs.sum() <= optimum * (1 + 1e-5) + 1e-4
    assert costs.sum() >= optimum * (1 - 1e-5) - 1e-4  # nothing cheaper than the optimum: costs are real


@pytest.mark.parametrize(("seed", "kp"), [(0, 2), (1, 2), (2, 3), (3, 2), (4, 3)])
def test_topk_assignment_is_optimal(seed, kp):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(20, 45)), int(rng.integers(kp + 2, 8))
    x = _points(n, 3, seed)
    centroids = x[rng.choice(n, k, replace=False)]
    held, costs, _ = balanced_assign(x, centroids, top_k=kp, tol=1e-6)
    assert all(len(set(row)) == kp for row in held.tolist())  # distinct clusters per point
    slots = np.bincount(held.reshape(-1), minlength=k)
    assert slots.max() - slots.min() <= 1 and slots.sum() == n * kp
    optimum = exact_topk_cost(_costs(x, centroids), kp)
    assert abs(costs.sum() - optimum) <= 1e-5 * optimum + 1e-4


@pytest.mark.parametrize(("n", "k", "kp"), [(1000, 7, 1), (1001, 16, 2), (997, 10, 3), (64, 64 // 2, 1)])
def test_prices_reproduce_the_assignment(n, k, kp):
    """argmin-top-k of cost + price gives every point its assigned clusters, up to ε."""
    x = _points(n, 5, 7)
    centroids = x[np.random.default_rng(0).choice(n, k, replace=False)]
    held, _, prices = balanced_assign(x, centroids, top_k=kp, tol=1e-5)
    reduced = _costs(x, centroids) + prices[None, :]
    kth_best = np.sort(reduced, axis=1)[:, kp - 1]
    eps = 1e-5 * np.sort(_costs(x, centroids), axis=1)[:, :kp].mean()
    assigned = np.take_along_axis(reduced, held, axis=1)
    assert (assigned <= kth_best[:, None] + 2 * eps + 1e-3 * eps + 1e-6).all()
    slots = np.bincount(held.reshape(-1), minlength=k)
    assert slots.max() - slots.min() <= 1


@pytest.mark.parametrize("seed", range(3))
def test_intermediate_steps_meet_their_stated_tolerance(seed):
    """A Lloyd step before the last stops at a coarser ε (the one it returns, also in stats as
    ``eps_relative``); by LP duality its cost is at most persons·ε above the exact balanced optimum."""
    rng = np.random.default_rng(seed)
    n, k = 91, 5  # 91 mod 5 = 1: one cluster of 19, four of 18, filled with help of 4 dummies
    x = _points(n, 3, seed)
    centroids = x[rng.choice(n, k, replace=False)].astype(np.float32)
    assigner = BalancedAssigner(x, k, top_k=1, tol=1e-4)
    for _ in range(4):
        held, costs, eps = assigner.step(centroids)
        sizes = np.bincount(held[:, 0], minlength=k)
        assert sizes.max() - sizes.min() <= 1
        optimum = exact_top1_cost(_costs(x, centroids))
        assert eps >= 1e-2 * assigner.scale * (1 - 1e-9)  # an intermediate step is coarser than the final one
        assert optimum * (1 - 1e-5) - 1e-4 <= costs.sum() <= optimum + (n + k - 1) * eps + 1e-4
        centroids = update_centroids(x, held, k)


# (n, seed, kp): top-k cases where the warm-started final step was up to 1.9 % above the optimum
# before phases were redone until every point is ε-happy (15 of 108 such cases then); (97, 0, 2) was
# 0.05 % above it until a bid for an extra slot was capped (see the test after this one); 0 of 108 now
_WARM = [(97, 0, 1), (97, 1, 1), (97, 2, 1), (97, 0, 3), (97, 2, 3), (99, 0, 3), (98, 5, 2), (97, 1, 2), (97, 0, 2)]


@pytest.mark.parametrize(("n", "seed", "kp"), _WARM)
def test_final_step_is_optimal_after_warm_started_steps(n, seed, kp):
    """The last assignment of balanced_kmeans starts from the previous step's prices and assignment
    (points still ε-happy stay); it must still be optimal to within ``tol`` for the final centroids."""
    x = _points(n, 3, seed)
    result, stats = balanced_kmeans(x, 6, top_k=kp, niter=5, seed=seed, tol=1e-6)
    cost = _costs(x, result.centroids)
    optimum = exact_top1_cost(cost) if kp == 1 else exact_topk_cost(cost, kp)
    total = stats["inertia"][-1] * n * kp
    assert optimum * (1 - 1e-5) - 1e-4 <= total <= optimum * (1 + 1e-5) + 1e-4
    assert result.sizes.max() - result.sizes.min() <= 1


@pytest.mark.parametrize(("n", "seed", "kp"), [(97, 0, 2), (98, 3, 1), (99, 4, 3), (101, 7, 2)])
def test_clusters_with_an_extra_slot_are_the_dearest(n, seed, kp):
    """When N·kp is not a multiple of k, the clusters that get ⌈N·kp/k⌉ slots must be the most
    expensive ones (to within ε): the LP's complementary slackness for the extra capacity. A point
    that paid far more for an extra slot than the cluster's price broke it ((97, 0, 2): 0.05 % above the
    optimum with every point ε-happy)."""
    x = _points(n, 3, seed)
    result, stats = balanced_kmeans(x, 6, top_k=kp, niter=5, seed=seed, tol=1e-6)
    floor = n * kp // 6
    assert (result.sizes > floor).any() and (result.sizes == floor).any()
    slack = 1e-4 * stats["inertia"][-1]  # ε is 1e-6 of the scale; the broken case was off by 9 % of it
    assert result.prices[result.sizes > floor].min() >= result.prices[result.sizes == floor].max() - slack


def test_a_phase_left_unhappy_is_not_silent(monkeypatch):
    """A top-k phase is redone while points end not ε-happy; if the redos run out, the caller is told
    (the result may then be above the stated tolerance). Here every phase is made to look unsettled."""
    import warnings

    import pipeline.clustering.auction as auction_module

    x = _points(98, 3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balanced_kmeans(x, 6, top_k=2, niter=5, seed=0, tol=1e-6)
    monkeypatch.setattr(auction_module, "_MAX_REPEATS", 2)
    monkeypatch.setattr(auction_module, "unhappy", lambda *args: True)
    with pytest.warns(RuntimeWarning, match="not ε-happy after 2 redos"):
        balanced_kmeans(x, 6, top_k=2, niter=5, seed=0, tol=1e-6)


@pytest.mark.parametrize("kp", [1, 2, 3])
def test_points_still_happy_where_they_were_stay(kp, monkeypatch):
    """The same centroids again, at the ε the last assignment ended with: every point is still ε-happy
    in its clusters, so every point keeps them in the opening round — what makes late Lloyd steps
    cheap — and the assignment is as good (top-1: the same). Top-1: (nearly) nobody bids one at a time afterwards.
    (Top-k: the few points that lose an extra slot can start a long price war at so small an ε.)"""
    import pipeline.clustering.auction as auction_module

    stayed: list[int] = []
    stay_round = auction_module.stay_round

    def counting(*args):
        waiting, count = stay_round(*args)
        stayed.append(count)
        return waiting, count

    monkeypatch.setattr(auction_module, "stay_round", counting)
    n, k = 600, 7
    x = _points(n, 3, kp)
    centroids = x[np.random.default_rng(kp).choice(n, k, replace=False)]
    assigner = BalancedAssigner(x, k, top_k=kp, tol=1e-4)
    first, first_costs, _ = assigner.step(centroids, final=True)
    cold_bids = assigner.total("bids")
    stayed.clear()
    second, second_costs, _ = assigner.step(centroids, final=True)
    warm_bids = assigner.steps[-1]["bids"]
    assert abs(second_costs.sum() - first_costs.sum()) <= 1e-4 * first_costs.sum()  # both within tol
    assert np.ptp(np.bincount(second.reshape(-1), minlength=k)) <= 1
    if kp == 1:
        np.testing.assert_array_equal(first, second)
        assert cold_bids > 2 * n  # the cold start really bids (so the warm figure means something)
        assert warm_bids <= n + 4 * k  # one opening bid per point; the extra slots and the dummies settle
    else:
        assert stayed[0] == n


def test_kmeans_exact_balance_and_determinism():
    x = _points(3000, 8, 3)
    a, stats = balanced_kmeans(x, 12, top_k=2, niter=6, seed=5)
    b, _ = balanced_kmeans(x, 12, top_k=2, niter=6, seed=5)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert stats["size_max"] - stats["size_min"] <= 1
    assert a.sizes.sum() == 3000 * 2
    assert len(stats["inertia"]) == 7
    # one entry per step (6 Lloyd steps and the final assignment), each step timed and bidding
    assert len(stats["step_seconds"]) == len(stats["bids_per_slot_by_step"]) == 7
    assert min(stats["step_seconds"]) > 0 and min(stats["bids_per_slot_by_step"]) > 0


@pytest.mark.parametrize(("seed", "n", "kp"), [(11, 120, 1), (12, 120, 1), (13, 120, 1), (21, 60, 2), (22, 60, 2)])
def test_mse_matches_balanced_lloyd_with_exact_assignments(seed, n, kp):
    """Same initial centroids: every step exact (LP) vs ours → final MSE per slot within 1 %."""
    rng = np.random.default_rng(seed)
    x = _points(n, 4, seed)
    k = 6
    init = x[rng.choice(n, k, replace=False)].copy()
    _ours, stats = balanced_kmeans(x, k, top_k=kp, niter=8, init=init)

    centroids = init.astype(np.float32)
    for _ in range(8):
        centroids = update_centroids(x, exact_topk_assignment(_costs(x, centroids), kp), k)
    cost = _costs(x, centroids)
    reference = exact_topk_cost(cost, kp) / (n * kp)
    assert stats["inertia"][-1] <= reference * 1.01


def test_update_centroids_is_the_mean():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assignment = np.array([[0, 1], [0, 1], [1, 2], [2, 0], [1, 2], [2, 0]])
    got = update_centroids(x, assignment, 3)
    for j in range(3):
        np.testing.assert_allclose(got[j], x[(assignment == j).any(1)].mean(0), rtol=1e-6)


@pytest.mark.parametrize(
    ("x", "k", "top_k", "message"),
    [
        (np.zeros((5, 3), np.float32), 8, 1, r"n_rows=5 should be ≥ k=8"),
        (np.zeros((50, 3), np.float32), 4, 4, r"top_k=4 should be ≥ 1 and < k=4"),
        (np.zeros((50,), np.float32), 4, 1, r"2-D"),
        (
            np.array([[0.0, np.nan]] + [[1.0, 2.0]] * 20, np.float32),
            4,
            1,
            r"1 rows contain NaN or Inf \(first: row 0\)",
        ),
    ],
)
def test_bad_input_is_one_line_error(x, k, top_k, message):
    with pytest.raises(LprError, match=message) as err:
        balanced_kmeans(x, k, top_k=top_k, niter=1)
    assert "\n" not in str(err.value)


def test_iterations_on_a_sample_then_every_row_assigned_optimally():
    """fit_rows: Lloyd on a sample, then one exact assignment of every row for the final centroids."""
    n = 300
    x = _points(n, 3, 4)
    result, stats = balanced_kmeans(x, 6, top_k=2, niter=5, seed=4, tol=1e-6, fit_rows=60)
    assert (stats["fit_rows"], stats["rows"], result.assignment.shape) == (60, n, (n, 2))
    assert result.sizes.max() - result.sizes.min() <= 1 and result.sizes.sum() == n * 2
    optimum = exact_topk_cost(_costs(x, result.centroids), 2)
    total = stats["inertia"][-1] * n * 2
    assert optimum * (1 - 1e-5) - 1e-4 <= total <= optimum * (1 + 1e-5) + 1e-4
    with pytest.raises(LprError, match=r"fit_rows=4 should be ≥ k=6"):
        balanced_kmeans(x, 6, fit_rows=4)
