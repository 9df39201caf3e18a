"""Balance for routers in the family's own form (``router.form: native``), calibrated in the model.

A native router is the gate as a compact dot-product LPR (``gate_router``: encoder = gate weight
(E, H), prototypes = identity) whose only free tensors are the ones the family declares, so that
``fold_router`` always writes it back into the family's tensors. Its balance lives where the
family can carry it, layer by layer in model order (as ``calibrate_in_model``):

* **choice bias** (DeepSeek-V3's ``e_score_correction_bias``, Ernie, LFM2 …): the LPR's ``bias``,
  calibrated as for the LPR — exact, and the weights stay the gate's own.
* **logit bias only** (GPT-OSS): a per-expert offset c on the *logits* that balances the top-k of
  ``logits + c`` goes into the encoder bias (= the gate's bias). It moves the weights too (a logit
  bias is not a choice bias: ``pipeline.router.native``).
* **neither** (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE …): the offset is folded into the gate weight
  along the direction v in which the router input stays most nearly constant. With m (H,) and
  Σ (H, H) the mean and covariance of the inputs x that the router gets in the model,
  ``v = Σ⁻¹m / (mᵀΣ⁻¹m)`` makes ``s = v·x`` have mean 1 and the least variance of any such
  projection; ``w_e += c_e·v`` turns the logits into ``l + c·s``. Since s > 0 rescales a token's
  logits without reordering them, ``c`` is calibrated on ``l / s`` (not l): top-k of ``l + c·s`` is
  then balanced on the calibration tokens with s > 0, and rounds of price adjustment on the folded
  routing itself correct for the tokens with s ≤ 0. On unseen text the balance holds as far as s
  stays near 1 (its spread and the share of s ≤ 0 are reported). The fold changes the weights as a
  logit bias does.

Offsets are calibrated as a choice on the logits (top-k of l + c): for softmax and sigmoid families
that is the same choice as the family's top-k of softmax/sigmoid(l + c) (both increase with l + c
within a token); a group-limited top-k that ranks groups by sums of probabilities is approximated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.family import Family
from pipeline.moe.loading import find_routers
from pipeline.progress import progress_bar
from pipeline.router.calibrate import at_router_input, calibrate_in_model, router_logits
from pipeline.router.from_clusters import calibrate_bias
from pipeline.router.lpr import LatentPrototypeRouter

ON_LOGITS = ("topk_softmax", "topk_sigmoid", "llama4", "sparsemixer")  # conventions that choose on the logits


def frozen_parameters(family: Family) -> tuple[str, ...]:
    """Names of a gate-form LPR's parameters a native distillation keeps fixed: all but the gate weight
    (``encoder.weight``) and, where the family has a logit bias, ``encoder.bias``."""
    frozen = ("prototypes", "log_temperature", "log_precision")
    return frozen if family.logit_bias else (*frozen, "encoder.bias")


def check_gate_form(router: LatentPrototypeRouter) -> None:
    """The router is a gate-form LPR (dot product, identity prototypes): offsets on its encoder are logit offsets."""
    eye = torch.eye(router.num_experts, dtype=router.prototypes.dtype, device=router.prototypes.device)
    assert router.spec.similarity == "dot" and torch.equal(router.prototypes.detach(), eye), "not a gate-form LPR"


def logit_offsets(router: LatentPrototypeRouter, logits: torch.Tensor) -> torch.Tensor:
    """Per-expert offsets c (E,) float32, zero mean, such that the top-k of ``logits + c`` is balanced
    (the router's own group limit included). logits (T, E)."""
    convention = router.spec.convention if router.spec.convention in ON_LOGITS else "topk_softmax"
    chooser = LatentPrototypeRouter(replace(router.spec, convention=convention, latent_dim=1))
    calibrate_bias(chooser, logits.float())
    return chooser.bias.detach().clone()


def slots(router: LatentPrototypeRouter, logits: torch.Tensor) -> np.ndarray:
    """Top-k slots per expert (E,) int64 that the router's own rule gives on logits (T, E) (its bias included)."""
    with torch.no_grad():
        indices = router.route(logits.float())[1]
    return np.bincount(indices.reshape(-1).cpu().numpy(), minlength=router.num_experts)


def constant_direction(mean: torch.Tensor, second: torch.Tensor, rows: int) -> tuple[torch.Tensor, float]:
    """v (H,) float64 with v·m = 1 and the least variance of v·x, and that standard deviation.

    mean (H,): Σx / rows; second (H, H): Σxxᵀ (float64). A ridge of 1e-8 × the mean variance keeps Σ invertible."""
    covariance = second / rows - torch.outer(mean, mean)
    ridge = 1e-8 * float(covariance.diagonal().mean()) + 1e-30
    solved = torch.linalg.solve(covariance + ridge * torch.eye(len(mean), dtype=covariance.dtype), mean)
    v = solved / (mean @ solved)
    return v, float((v @ covariance @ v).clamp_min(0).sqrt())


def refine_offsets(
    router: LatentPrototypeRouter, logits: torch.Tensor, s: torch.Tensor, c: torch.Tensor, rounds: int = 80
) -> tuple[torch.Tensor, np.ndarray]:
    """Correct offsets c (E,) for the tokens the fold does not merely rescale (s ≤ 0): rounds of
    c −= step · (slots / mean − 1) on the routing the folded weight gives, ``logits + s·c``, keeping the
    most even c seen. logits (T, E), s (T,) → (c, slots per expert (E,))."""
    step = 0.1 * float(logits.std())
    counts = slots(router, logits + s[:, None] * c)
    best = (int(counts.max() - counts.min()), c.clone(), counts)
    tolerance = max(2, int(0.002 * counts.mean()))
    for _ in range(rounds):
        if best[0] <= tolerance:
            break
        c = c - step * torch.from_numpy(counts / counts.mean() - 1.0).float()
        c, step = c - c.mean(), step * 0.95
        counts = slots(router, logits + s[:, None] * c)
        if counts.max() - counts.min() < best[0]:
            best = (int(counts.max() - counts.min()), c.clone(), counts)
    return best[1], best[2]


def input_moments(model: nn.Module, router: nn.Module, ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """(mean (H,), Σxxᵀ (H, H), rows) float64 of the router's inputs in the model over the sequences ids (n, S)."""
    total: dict[str, Any] = {"sum": 0.0, "outer": 0.0, "rows": 0}

    def add(x: torch.Tensor) -> None:
        x = x.double().cpu()
        total["sum"] = total["sum"] + x.sum(0)
        total["outer"] = total["outer"] + x.T @ x
        total["rows"] += len(x)

    at_router_input(model, router, ids, batch, add)
    return total["sum"] / total["rows"], total["outer"], total["rows"]


def fold_into_weight(model: nn.Module, router: LatentPrototypeRouter, ids: torch.Tensor, batch: int) -> dict[str, Any]:
    """The weight-only calibration of one gate-form router installed in ``model`` (see the module
    docstring): two passes over ids (n, S) up to the router (moments, then logits and s = v·x)."""
    check_gate_form(router)
    mean, second, rows = input_moments(model, router, ids, batch)
    v, spread = constant_direction(mean, second, rows)
    logits, scale = [], []

    def keep(x: torch.Tensor) -> None:
        x = x.to(router.encoder.weight.dtype)
        logits.append(router.scores(x).float().cpu())
        scale.append((x.double().cpu() @ v).float())

    at_router_input(model, router, ids, batch, keep)
    logits_all, s = torch.cat(logits), torch.cat(scale)
    before = slots(router, logits_all)
    c = logit_offsets(router, logits_all / torch.where(s > 0, s, 1.0)[:, None])
    c, after = refine_offsets(router, logits_all, s, c)
    with torch.no_grad():
        router.encoder.weight.add_(torch.outer(c.double(), v).to(router.encoder.weight.dtype))
    return {
        "calibration_rows": int(rows),
        "slots_min": int(after.min()),
        "slots_max": int(after.max()),
        "unbalanced_slots": [int(before.min()), int(before.max())],
        "constant_direction_std": round(spread, 6),  # std of s = v·x (mean 1)
        "nonpositive_share": round(float((s <= 0).float().mean()), 6),  # tokens whose logits the fold reorders
        "max_offset": round(float(c.abs().max()), 6),
    }


def into_logit_bias(model: nn.Module, router: LatentPrototypeRouter, ids: torch.Tensor, batch: int) -> dict[str, Any]:
    """A family with a logit bias and no choice bias: the balancing logit offsets added to the encoder bias."""
    check_gate_form(router)
    logits = router_logits(model, router, ids, batch)
    before = slots(router, logits)
    c = logit_offsets(router, logits)
    with torch.no_grad():
        router.encoder.bias.add_(c.to(router.encoder.bias.dtype))
    after = slots(router, logits + c)
    return {
        "calibration_rows": len(logits),
        "slots_min": int(after.min()),
        "slots_max": int(after.max()),
        "unbalanced_slots": [int(before.min()), int(before.max())],
        "max_offset": round(float(c.abs().max()), 6),
    }


def calibrate_native_in_model(
    model: nn.Module, ids: torch.Tensor, *, family: Family, batch: int = 16, quiet: bool = False
) -> dict[str, dict[str, Any]]:
    """``calibrate_in_model`` for native routers: per router module name the calibration figures, each
    balance put where ``family`` can carry it (module docstring). The LPR's choice ``bias`` stays 0
    where the family has no tensor for it."""
    if family.choice_bias:
        return calibrate_in_model(model, ids, batch=batch, quiet=quiet)
    sites = [site for site in find_routers(model) if isinstance(site.module, LatentPrototypeRouter)]
    calibrate = into_logit_bias if family.logit_bias else fold_into_weight
    results = {}
    with contextlib.nullcontext(None) if quiet else progress_bar("calibrate in the gate weights", len(sites)) as bar:
        for site in sites:
            with torch.no_grad():
                site.module.bias.zero_()
            results[site.name] = calibrate(model, site.module, ids, batch)
            if bar is not None:
                bar.advance(1, note=site.name)
    return results


def calibrator_for(form: str, model: nn.Module) -> Callable[..., dict[str, dict[str, Any]]]:
    """How routers of ``form`` ("lpr" or "native") installed in ``model`` are balanced in the model: the choice
    bias (``calibrate_in_model``), or where the model's family carries balance (``calibrate_native_in_model``).
    Called as ``calibrator(model, ids (n, S), batch=…)``; distill and recalibrate share it."""
    if form != "native":
        return calibrate_in_model
    return partial(calibrate_native_in_model, family=FAMILIES[family_of(model.config)])
