"""Routers in the family's own form: the tensors a drop-in checkpoint of the original architecture carries.

A family declares a gate weight (E, H), a logit bias (E,) where it has one (GPT-OSS ``router.bias``)
and a per-expert *choice* bias where it has one (DeepSeek-V3's ``e_score_correction_bias``, Ernie's
``moe_statics``, AFMoE's and LFM2's ``expert_bias`` …: ``Family.choice_bias``). ``FamilyRouter``
holds exactly those; a native distillation (``router.form: native``) can produce it directly, and
``fold_router`` produces it from an LPR when the LPR is one in disguise:

* **dot product**: ``logits = P·(W·x + b) = (P·W)·x + P·b`` with encoder W (d, H), b (d,) and
  prototypes P (E, d) — exact, whatever the latent size d (an encoder narrower than E folds into a
  gate weight of rank ≤ d). A variational encoder routes on its mean, which is this W. The dot
  product has no temperature. ``P·b`` is the family's logit bias; where it has none it must be 0.
* **cosine, gaussian, mahalanobis**: the logits are not linear in x (a norm, or ‖z‖² that is not
  shift-free for the logits the router returns): no gate weight expresses them.
* **choice bias**: the LPR adds its ``bias`` to what the family ranks experts by — the softmax
  probability, the sigmoid score (group ranking included: DeepSeek-V3's groups rank by the sum of
  their best two *biased* scores, as ``limit_groups`` does), or the logit (top-k-first families) —
  and takes the weights from the unbiased scores. That is the definition of each family's own
  choice bias (``pipeline.moe.family``'s table; ``tests/test_families.py`` checks it against the
  family's code with random biases), so it maps 1:1. A family with no choice-bias tensor carries
  no bias at all: it must be 0. (Not even a bias equal for every expert: top-k of s + c is top-k
  of s only in exact arithmetic; in float32, 0.3 + p rounds every probability p below ~3e-8 to
  0.3, and the ties it makes pick other experts — measured on the tiny Qwen3-MoE and Mixtral.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import LprError
from pipeline.moe.families import family_of
from pipeline.moe.family import Family
from pipeline.moe.loading import find_routers
from pipeline.router.load import convention
from pipeline.router.lpr import LatentPrototypeRouter, spec_for

NATIVE_HINT = (
    "for a drop-in checkpoint distil in the family's own form (router.form: native); the LPR form "
    "ships with `lpr-distill export RUN_DIR` and loads with load_lpr_model"
)


@dataclass(frozen=True)
class FamilyRouter:
    """One router as the family's own tensors (float64, exact)."""

    weight: torch.Tensor  # (E, H): logits = weight · x (+ logit_bias)
    logit_bias: torch.Tensor | None  # (E,) where the family has a logit bias, else None
    choice_bias: torch.Tensor | None  # (E,) where the family has a choice-bias tensor, else None


def drop_in_form(family: Family) -> str:
    """What a drop-in checkpoint of ``family`` carries per router, in words (the compat matrix's column)."""
    if family.logit_bias:
        return "weight + logit bias"
    return "weight + choice bias" if family.choice_bias else "weight"


def state_keys(family: Family, site: str) -> dict[str, str]:
    """Module state key of each of the family's router tensors (``weight``, ``logit_bias``,
    ``choice_bias``) for the router at module name ``site``."""
    keys = {"weight": f"{site}.{family.gate}"}
    if family.logit_bias:
        keys["logit_bias"] = f"{site}.{family.logit_bias}"
    if family.choice_bias:
        block = site.rpartition(".")[0]
        bias = family.choice_bias
        keys["choice_bias"] = f"{block}.{bias[1:]}" if bias.startswith("^") else f"{site}.{bias}"
    return keys


def fold_router(router: LatentPrototypeRouter, family: Family) -> FamilyRouter:
    """The family's tensors that route exactly as ``router`` does; a ``ValueError`` saying why not."""
    spec = router.spec
    if spec.similarity != "dot":
        raise ValueError(f"a {spec.similarity}-similarity LPR is not linear in x (only a dot-product LPR folds)")
    with torch.no_grad():
        prototypes = router.prototypes.double()  # (E, d)
        weight = prototypes @ router.encoder.weight.double()  # (E, d) @ (d, H) → (E, H)
        logit_bias = prototypes @ router.encoder.bias.double()  # (E,)
        choice_bias = router.bias.double()  # (E,)
    reasons = []
    if not family.logit_bias and bool(logit_bias.abs().max() > 0):
        reasons.append(
            f"its encoder bias adds per-expert logit offsets (max |P·b| {float(logit_bias.abs().max()):.3g}) "
            f"and a {family.name} gate has no bias"
        )
    if not family.choice_bias and bool(choice_bias.abs().max() > 0):
        reasons.append(
            f"its per-expert choice bias (max |b| {float(choice_bias.abs().max()):.3g}) has no tensor in a "
            f"{family.name} checkpoint (engines would route without it)"
        )
    if reasons:
        raise ValueError("; ".join(reasons))
    return FamilyRouter(
        weight=weight,
        logit_bias=logit_bias if family.logit_bias else None,
        choice_bias=choice_bias if family.choice_bias else None,
    )


Routers = dict[str, LatentPrototypeRouter | FamilyRouter]  # keyed by router module name


def fold_routers(routers: Routers, family: Family) -> dict[str, FamilyRouter]:
    """Every router in the family's form (LPRs folded, ``FamilyRouter``s as they are — what a native
    distillation gives), or one line naming the first that does not fold."""
    folded, problems = {}, {}
    for name, router in routers.items():
        try:
            folded[name] = router if isinstance(router, FamilyRouter) else fold_router(router, family)
        except ValueError as err:
            problems[name] = str(err)
    if problems:
        name, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more of {len(routers)} routers)" if len(problems) > 1 else ""
        raise LprError(f"router {name} cannot be written in {family.name}'s own form: {why}{more}", NATIVE_HINT)
    return folded


def check_routers_fit(routers: Routers, model: nn.Module, *, source: Any) -> None:
    """The routers were made for ``model``'s architecture: sizes, weight convention and MoE layers
    (as ``load_lpr_model`` checks); one line naming the mismatches otherwise."""
    problems = next((p for name, r in routers.items() if (p := _mismatches(name, r, model.config))), [])
    sites = sorted(site.name for site in find_routers(model))
    if not problems and sorted(routers) != sites:
        odd = sorted(set(sites) ^ set(routers))[0]
        problems = [f"routers for {len(routers)} MoE layers ≠ the model's {len(sites)} (e.g. {odd})"]
    if problems:
        raise LprError(
            f"the routers were made for another model than {source} ({family_of(model.config)}): {'; '.join(problems)}",
            "export routers distilled from this checkpoint (the run's model.path)",
        )


def _mismatches(name: str, router: LatentPrototypeRouter | FamilyRouter, config: Any) -> list[str]:
    if isinstance(router, FamilyRouter):  # the family's own tensors: only their shape can be wrong
        expected = spec_for(config, latent_dim=1)
        shape = (expected.num_experts, expected.hidden_size)
        mine = tuple(router.weight.shape)
        return [] if mine == shape else [f"router {name}'s weight {mine} ≠ the model's {shape}"]
    spec = router.spec
    expected = spec_for(config, latent_dim=spec.latent_dim, similarity=spec.similarity)
    return [
        f"router {name}'s {what} {mine} ≠ the model's {theirs}"
        for what, mine, theirs in (
            ("hidden size", spec.hidden_size, expected.hidden_size),
            ("experts", spec.num_experts, expected.num_experts),
            ("top-k", spec.top_k, expected.top_k),
            ("weight convention", convention(spec), convention(expected)),
        )
        if mine != theirs
    ]
