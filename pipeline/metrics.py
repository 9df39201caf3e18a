"""Expert-load metrics: how evenly the routing spreads work over the experts."""

from __future__ import annotations

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
