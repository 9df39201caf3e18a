"""Which expert each cluster stands for: a one-to-one matching on how the teacher routes its tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def co_occurrence(assignment: np.ndarray, teacher_topk: np.ndarray, num_experts: int) -> np.ndarray:
    """counts[c, e]: teacher slots of expert e among the tokens of cluster c.

    assignment: (N, kp) int clusters per token; teacher_topk: (N, k) int experts per token
    → (num_experts, num_experts) int64 (clusters × experts).
    """
    n, kp = assignment.shape
    k = teacher_topk.shape[1]
    pairs = assignment[:, :, None].astype(np.int64) * num_experts + teacher_topk[:, None, :].astype(np.int64)
    counts = np.bincount(pairs.reshape(-1), minlength=num_experts * num_experts)
    assert pairs.size == n * kp * k
    return counts.reshape(num_experts, num_experts)


def match_clusters(
    assignment: np.ndarray, teacher_topk: np.ndarray, num_experts: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Match clusters to experts one-to-one, maximising the teacher slots they share (Hungarian).

    Returns expert_of_cluster (E,) int64 and stats: ``matched_share`` = Σ_tokens |π(clusters) ∩
    teacher top-k| / Σ_tokens min(kp, k), and ``chance_share`` for a random one-to-one matching.
    """
    counts = co_occurrence(assignment, teacher_topk, num_experts)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    expert_of_cluster = np.empty(num_experts, np.int64)
    expert_of_cluster[rows] = cols
    mapped = expert_of_cluster[assignment]  # (N, kp) experts the clusters stand for
    hits = (mapped[:, :, None] == teacher_topk[:, None, :]).any(axis=2).sum()
    n, kp = assignment.shape
    k = teacher_topk.shape[1]
    denominator = n * min(kp, k)
    stats = {
        "matched_share": float(hits / denominator),
        "chance_share": float(kp * k / num_experts / min(kp, k)),
        "matched_counts": counts[np.arange(num_experts), expert_of_cluster].tolist(),
    }
    return expert_of_cluster, stats
