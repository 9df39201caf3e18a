"""Expert-load metrics: how evenly the routing spreads work over the experts."""

from __future__ import annotations

from typing import Any

import numpy as np


def expert_load(topk_idx: np.ndarray, num_experts: int) -> np.ndarray:
    """Top-k slots per expert. topk_idx: (n, k) int → (num_experts,) int64."""
    return np.bincount(np.asarray(topk_idx).reshape(-1), minlength=num_experts).astype(np.int64)


def gini(load: np.ndarray) -> float:
    """Gini coefficient of a load vector (E,): 0 = perfectly even, → 1 = one expert takes all."""
    x = np.sort(np.asarray(load, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def min_max_ratio(load: np.ndarray) -> float:
    """Least-loaded over most-loaded expert (1 = even, 0 = a dead expert)."""
    x = np.asarray(load, dtype=np.float64)
    return float(x.min() / x.max()) if x.max() > 0 else 0.0


def coefficient_of_variation(load: np.ndarray) -> float:
    x = np.asarray(load, dtype=np.float64)
    return float(x.std() / x.mean()) if x.mean() > 0 else 0.0


def load_summary(load: np.ndarray) -> dict[str, float]:
    """The figures reported per layer: Gini, min/max, CV and the least-loaded expert's share of a fair share."""
    x = np.asarray(load, dtype=np.float64)
    fair = x.sum() / x.size if x.size else 0.0
    return {
        "gini": gini(x),
        "min_max": min_max_ratio(x),
        "cv": coefficient_of_variation(x),
        "min_fair_share": float(x.min() / fair) if fair > 0 else 0.0,
    }


def busiest_share(load: np.ndarray) -> float:
    """Share of all load that the busiest expert takes (1/E = even, 1 = one expert takes all)."""
    x = np.asarray(load, dtype=np.float64)
    return float(x.max() / x.sum()) if x.sum() > 0 else 0.0


def idle_experts(load: np.ndarray, fraction: float = 0.01) -> int:
    """Experts whose load is below ``fraction`` of a fair share (sum / E): effectively unused."""
    x = np.asarray(load, dtype=np.float64)
    fair = x.sum() / x.size if x.size else 0.0
    return int(np.sum(x < fraction * fair)) if fair > 0 else int(x.size)


def _per_batch(loads: np.ndarray) -> np.ndarray:
    x = np.asarray(loads, dtype=np.float64)
    return x[None, :] if x.ndim == 1 else x


def overflow_share(loads: np.ndarray, factor: float) -> float:
    """Share of slots a capacity-limited system would drop.

    loads: (E,) or (B, E) slots per expert in each of B batches. Each expert holds at most
    ``factor`` × the batch's mean load; the excess over that capacity, summed over experts and
    batches, over all slots. 0 when every expert is within capacity.
    """
    x = _per_batch(loads)
    capacity = factor * x.sum(1, keepdims=True) / x.shape[1]
    total = x.sum()
    return float(np.clip(x - capacity, 0, None).sum() / total) if total > 0 else 0.0


def ep_balancedness(loads: np.ndarray, devices: int) -> float | None:
    """Expert-parallel efficiency: mean over max device load when the E experts are split evenly
    (contiguously, E/devices each) over ``devices`` devices.

    loads: (E,) or (B, E); with B batches, Σ_b mean_b / Σ_b max_b (each step waits for its busiest
    device). 1 = every device equally busy. None when E is not a multiple of ``devices``.
    """
    x = _per_batch(loads)
    if x.shape[1] % devices:
        return None
    per_device = x.reshape(x.shape[0], devices, -1).sum(-1)  # (B, devices)
    busiest = per_device.max(1).sum()
    return float(per_device.mean(1).sum() / busiest) if busiest > 0 else 0.0


def topk_agreement(indices: np.ndarray, teacher: np.ndarray) -> float:
    """Share of the router's top-k slots (n, k) whose expert is in the teacher's top-k set (n, k)."""
    a, t = np.asarray(indices), np.asarray(teacher)
    if a.size == 0:
        return 0.0
    return float((a[:, :, None] == t[:, None, :]).any(-1).mean())


def balance_figures(load: np.ndarray, idle_fraction: float = 0.01) -> dict[str, float]:
    """The even-ness of one load vector (E,): Gini, min/max, CV, busiest share, idle experts."""
    return {
        "gini": gini(load),
        "min_max": min_max_ratio(load),
        "cv": coefficient_of_variation(load),
        "busiest_share": busiest_share(load),
        "idle_experts": idle_experts(load, idle_fraction),
    }


def layer_metrics(
    slots: np.ndarray,
    soft: np.ndarray,
    *,
    capacity_factors: tuple[float, ...] = (1.0, 1.25),
    devices: tuple[int, ...] = (2, 4, 8),
    idle_fraction: float = 0.01,
) -> dict:
    """Every load figure of one MoE layer.

    slots: (B, E) top-k slots per expert in each of B batches; soft: (B, E) routing-weight mass.
    Returns ``slot`` and ``soft`` balance figures of the totals, ``overflow`` per capacity factor
    and ``ep_balancedness`` per device count (both per batch, on slots).
    """
    slots, soft = _per_batch(slots), _per_batch(soft)
    return {
        "slot": balance_figures(slots.sum(0), idle_fraction),
        "soft": balance_figures(soft.sum(0), idle_fraction),
        "overflow": {f"{f:g}x": overflow_share(slots, f) for f in capacity_factors},
        "ep_balancedness": {f"{d}": ep_balancedness(slots, d) for d in devices},
        "slot_load": slots.sum(0).astype(np.int64).tolist(),
        "soft_load": [round(float(v), 4) for v in soft.sum(0)],
    }


def average_layers(layers: list[dict]) -> dict:
    """The mean over layers of every number in the nested per-layer dicts (lists and None are left out)."""

    def mean(values: list) -> object:
        first = values[0]
        if isinstance(first, dict):
            means = {key: mean([v[key] for v in values]) for key in first}
            return {key: value for key, value in means.items() if value is not None}
        if first is None or isinstance(first, list):
            return None
        return float(np.mean(values))

    return mean(layers)


def document_interval(
    doc_slots: list[np.ndarray], *, draws: int = 1000, coverage: float = 0.9, seed: int = 0
) -> dict[str, Any]:
    """How much the layer-mean slot Gini and min/max owe to *which* documents were held out.

    doc_slots: per layer, (D, E) top-k slots per expert from each of D documents. Resamples the
    documents with replacement ``draws`` times (seeded) and returns the central ``coverage``
    interval [low, high] of the layer-mean Gini and min/max over the draws: routing follows the
    document, so one unusual document can move the figures more than any router change does.

    Also the *noise floor* (``noise_gini``, ``noise_min_max``): the mean figures over the same draws
    of documents moved so that, pooled, every expert has the same share (each document keeps how
    it differs from the others: its slots minus its total × (pooled share − 1/E)) — what a router
    balanced over the whole population of such documents would still show on D of them. A Gini near
    its floor says these documents cannot show the router's remaining imbalance; far above it, the
    imbalance is systematic.
    """
    documents = doc_slots[0].shape[0]
    weights = np.random.default_rng(seed).multinomial(documents, np.full(documents, 1 / documents), size=draws)
    sums = {name: np.zeros(draws) for name in ("gini", "min_max", "noise_gini", "noise_min_max")}
    for slots in doc_slots:
        slots = np.asarray(slots, np.float64)
        share = slots.sum(0) / max(slots.sum(), 1.0)
        balanced = slots - slots.sum(1, keepdims=True) * (share - 1 / slots.shape[1])  # (D, E)
        for prefix, rows in (("", slots), ("noise_", balanced)):
            loads = np.clip(weights @ rows, 0, None)  # (draws, E)
            sums[prefix + "gini"] += [gini(load) for load in loads]
            sums[prefix + "min_max"] += [min_max_ratio(load) for load in loads]
    tail = 100 * (1 - coverage) / 2
    means = {name: values / len(doc_slots) for name, values in sums.items()}
    return {
        "gini": [float(v) for v in np.percentile(means["gini"], [tail, 100 - tail])],
        "min_max": [float(v) for v in np.percentile(means["min_max"], [tail, 100 - tail])],
        "noise_gini": float(means["noise_gini"].mean()),
        "noise_min_max": float(means["noise_min_max"].mean()),
    }
