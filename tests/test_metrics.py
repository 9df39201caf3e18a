"""Load metrics against slow, obvious definitions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    average_layers,
    balance_figures,
    busiest_share,
    coefficient_of_variation,
    document_interval,
    ep_balancedness,
    expert_load,
    gini,
    idle_experts,
    layer_metrics,
    load_summary,
    min_max_ratio,
    overflow_share,
    topk_agreement,
)


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


def test_hand_computed_vector():
    load = np.array([1, 2, 3, 4])  # mean 2.5, population std sqrt(1.25)
    # Gini: sum over pairs |xi - xj| = 2·(1+2+3+1+2+1) = 20; 20 / (2 · 16 · 2.5) = 0.25
    assert gini(load) == pytest.approx(0.25)
    assert min_max_ratio(load) == pytest.approx(0.25)
    assert coefficient_of_variation(load) == pytest.approx(np.sqrt(1.25) / 2.5)
    assert busiest_share(load) == pytest.approx(0.4)
    assert idle_experts(load, 0.5) == 1  # 1 < 0.5 · 2.5 = 1.25; 2 is not
    assert idle_experts(load, 0.01) == 0


def test_empty_expert():
    load = np.array([0, 5, 5, 10])
    assert min_max_ratio(load) == 0.0
    assert idle_experts(load) == 1
    assert busiest_share(load) == pytest.approx(0.5)
    # pairs: |0-5|·2 + |0-10| + 0 + |5-10|·2 = 30, doubled 60; 60 / (2 · 16 · 5) = 0.375
    assert gini(load) == pytest.approx(0.375)
    figures = balance_figures(load)
    assert figures["idle_experts"] == 1 and figures["min_max"] == 0.0


def test_overflow_at_capacity():
    # mean 3 per expert; capacity 1.0x = 3: expert 0 drops 6 - 3 = 3 of 12 slots
    assert overflow_share(np.array([6, 3, 2, 1]), 1.0) == pytest.approx(3 / 12)
    # capacity 1.25x = 3.75: drops 6 - 3.75 = 2.25 of 12
    assert overflow_share(np.array([6, 3, 2, 1]), 1.25) == pytest.approx(2.25 / 12)
    assert overflow_share(np.full(4, 3), 1.0) == 0.0
    # per batch: batch 1 even (nothing dropped), batch 2 all on one expert: 8 - 2 = 6 dropped of 16 slots
    batches = np.array([[2, 2, 2, 2], [8, 0, 0, 0]])
    assert overflow_share(batches, 1.0) == pytest.approx(6 / 16)
    assert overflow_share(batches.sum(0), 1.0) == pytest.approx((10 - 4) / 16)  # pooled: hides nothing here


def test_expert_parallel_balancedness():
    load = np.array([4, 0, 2, 2, 1, 1, 1, 1])
    # 2 devices: [8, 4] → mean 6 / max 8
    assert ep_balancedness(load, 2) == pytest.approx(0.75)
    # 4 devices: [4, 4, 2, 2] → 3 / 4
    assert ep_balancedness(load, 4) == pytest.approx(0.75)
    # 8 devices: each expert alone → mean 1.5 / max 4
    assert ep_balancedness(load, 8) == pytest.approx(0.375)
    assert ep_balancedness(load, 3) is None  # 8 experts do not split evenly over 3 devices
    # per batch: each step waits for its busiest device: (2 + 2) / (2 + 4)
    assert ep_balancedness(np.array([[2, 2], [4, 0]]), 2) == pytest.approx(4 / 6)


def test_topk_agreement():
    router = np.array([[0, 1], [2, 3]])
    teacher = np.array([[1, 0], [2, 0]])
    assert topk_agreement(router, teacher) == pytest.approx(3 / 4)
    assert topk_agreement(teacher, teacher) == 1.0


def test_layer_metrics_and_average():
    slots = np.array([[3, 1, 0, 0], [1, 3, 0, 0]])
    soft = slots * 0.5
    layer = layer_metrics(slots, soft, capacity_factors=(1.0,), devices=(2, 3))
    assert layer["slot_load"] == [4, 4, 0, 0]
    assert layer["slot"]["idle_experts"] == 2 and layer["slot"]["min_max"] == 0.0
    assert layer["soft"]["gini"] == pytest.approx(layer["slot"]["gini"])
    # capacity 1.0x = 1 per expert per batch: (3 - 1) dropped in each batch → 4 of 8
    assert layer["overflow"]["1x"] == pytest.approx(0.5)
    assert layer["ep_balancedness"] == {"2": pytest.approx(0.5), "3": None}
    even = layer_metrics(np.full((1, 4), 2), np.full((1, 4), 1.0), capacity_factors=(1.0,), devices=(2, 3))
    mean = average_layers([layer, even])
    assert mean["slot"]["gini"] == pytest.approx(layer["slot"]["gini"] / 2)
    assert mean["overflow"]["1x"] == pytest.approx(0.25)
    assert mean["ep_balancedness"] == {"2": pytest.approx(0.75)}  # None (3 devices) is left out
    assert "slot_load" not in mean


def test_document_interval_collapses_when_every_document_routes_alike():
    """Documents with the same expert mix: every resampling gives the same load shape, so the interval
    is the single figure of that shape."""
    shape = np.array([4, 2, 1, 1])
    doc_slots = [np.outer(np.arange(1, 9), shape), np.outer(np.arange(1, 9), shape[::-1])]  # 2 layers, 8 docs
    interval = document_interval(doc_slots, draws=200)
    assert interval["gini"] == pytest.approx([gini(shape)] * 2)
    assert interval["min_max"] == pytest.approx([0.25, 0.25])


def test_document_interval_is_wide_when_each_document_takes_one_expert():
    """Document e sends every slot to expert e: all six together are perfectly even, but a resampling
    keeps all six with probability 6!/6⁶ ≈ 1.5 %, so nearly every draw leaves an expert idle."""
    experts = 6
    doc_slots = [np.eye(experts, dtype=np.int64) * 100]
    interval = document_interval(doc_slots, draws=1000, seed=3)
    assert gini(doc_slots[0].sum(0)) == 0.0 and min_max_ratio(doc_slots[0].sum(0)) == 1.0
    assert 0 < interval["gini"][0] < interval["gini"][1]
    assert interval["min_max"] == [0.0, 0.0]
    assert document_interval(doc_slots, draws=1000, seed=3) == interval  # seeded


def test_noise_floor_is_zero_when_every_document_routes_alike():
    """Documents with the same expert mix differ only in size: moved to a balanced pool they are all
    even, so a balanced router would show no imbalance on them at all."""
    shape = np.array([4, 2, 1, 1])
    interval = document_interval([np.outer(np.arange(1, 9), shape)], draws=200)
    assert interval["noise_gini"] == pytest.approx(0.0, abs=1e-12)
    assert interval["noise_min_max"] == pytest.approx(1.0)


def test_noise_floor_ignores_a_systematic_tilt():
    """Tilting every document toward expert 0 by the same share raises the observed Gini but not the
    floor: the floor measures how documents differ from one another, not the router's pooled bias."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(50, 400, size=40)
    doc_slots = np.stack([rng.multinomial(t, rng.dirichlet(np.ones(8))) for t in tokens]).astype(np.float64)
    tilt = np.array([0.3] + [-0.3 / 7] * 7)
    tilted = doc_slots + tokens[:, None] * tilt
    plain, skewed = document_interval([doc_slots], seed=1), document_interval([tilted], seed=1)
    assert skewed["noise_gini"] == pytest.approx(plain["noise_gini"])
    assert skewed["noise_min_max"] == pytest.approx(plain["noise_min_max"])
    assert gini(tilted.sum(0)) > gini(doc_slots.sum(0)) + 0.1
    assert skewed["gini"][0] > skewed["noise_gini"] + 0.1  # the observed figure sits far above its floor
    # the floor of these noisy documents is well above 0: 40 documents cannot show perfect balance
    assert 0.02 < plain["noise_gini"] < 0.2
