"""Training objectives shared by gate-level and model-level distillation: the balanced target
(Sinkhorn projection of the teacher onto uniform expert marginals), prototype diversity, and the
learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinkhorn_balance(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """probs (..., B, E), rows summing to 1 → the nearest (in KL) matrices with rows summing to 1 and
    every column summing to B/E: the routing with every expert equally loaded (per leading index)."""
    p = probs.clamp_min(1e-12)
    column_target = p.shape[-2] / p.shape[-1]
    for _ in range(iterations):
        p = p * (column_target / p.sum(-2, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
    return p


def teacher_target(teacher_logits: torch.Tensor, balance: float, iterations: int = 30) -> torch.Tensor:
    probs = torch.softmax(teacher_logits, dim=-1)
    if balance <= 0:
        return probs
    return (1 - balance) * probs + balance * sinkhorn_balance(probs, iterations)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, steps: int, warmup_share: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_share`` of the steps (at least one), then cosine decay to 0; any
    ``steps`` ≥ 1 (one-cycle schedulers fail on very short runs)."""
    warmup = max(1, round(warmup_share * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup + 1) / (steps - warmup + 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def diversity_penalty(prototypes: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of the prototypes (E, d): 0 when orthogonal."""
    unit = F.normalize(prototypes, dim=-1)
    gram = unit @ unit.T
    off = gram - torch.diag(torch.diagonal(gram))
    return off.square().sum() / max(1, prototypes.shape[0] * (prototypes.shape[0] - 1))
