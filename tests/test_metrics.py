"""Load metrics against slow, obvious definitions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import coefficient_of_variation, expert_load, gini, load_summary, min_max_ratio


def gini_by_pairs(x: np.ndarray) -> float:
    """Mean absolute difference over all pairs, halved, over the mean (the textbook definition)."""
    x = x.astype(float)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


@pytest.mark.parametrize("seed", range(5))
def test_gini_matches_pairwise_definition(seed):
    load = np.random.default_rng(seed).integers(0, 1000, size=16)
    assert gini(load) == pytest.approx(gini_by_pairs(load))


def test_extremes():
    assert gini(np.full(8, 5)) == 0.0
    assert gini(np.array([0, 0, 0, 12])) == pytest.approx(0.75)  # (n-1)/n for one expert taking all
    assert min_max_ratio(np.array([0, 4])) == 0.0
    assert coefficient_of_variation(np.full(4, 3)) == 0.0


def test_expert_load_counts_slots():
    idx = np.array([[0, 1], [1, 2], [1, 3]])
    np.testing.assert_array_equal(expert_load(idx, 5), [1, 3, 1, 1, 0])
    summary = load_summary(expert_load(idx, 5))
    assert summary["min_fair_share"] == 0.0 and summary["min_max"] == 0.0
