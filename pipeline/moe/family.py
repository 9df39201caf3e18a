"""How one MoE family's router is described (the ``Family`` record); the table of families is in
``pipeline/families.py``.

Routers are found generically (``pipeline.moe.loading.find_routers``: the class that the base model's
``_can_record_outputs["router_logits"]`` recorder targets). What differs per family, and lives here:

* what the router returns: ``(logits [T, E], weights [T, k], indices [T, k])`` (``triple``), or
  Llama 4's ``(dense scores [T, E], logits [T, E])`` (``scores_logits``);
* what it receives: ``x`` (2-D ``[T, H]`` or 3-D ``[B, S, H]``), plus for some families a per-expert
  bias that the MoE block holds and passes as a second positional argument;
* its **weight convention** — how logits become the weights the experts were trained with
  (``pipeline.router.lpr.LatentPrototypeRouter.route`` implements each one);
* where its own tensors sit (gate weight, logit bias, choice bias), so that an identity-configured
  LPR reproduces it exactly.

Conventions (the bias ``b`` only moves the *choice* of experts, never the weights):

| convention | choice | weights |
|---|---|---|
| ``softmax`` | top-k of softmax(l) + b, maybe group-limited | softmax(l) of the chosen, renormalised or not, × scale |
| ``sigmoid`` | top-k of sigmoid(l) + b, maybe group-limited | sigmoid(l) of the chosen, renormalised or not, × scale |
| ``topk_softmax`` | top-k of l + b | softmax over the k chosen logits |
| ``topk_sigmoid`` | top-k of l + b | sigmoid of the chosen logits, renormalised or not |
| ``llama4`` | top-k of l + b | sigmoid of the chosen logits, scattered into a dense [T, E] (0 elsewhere) |
| ``sparsemixer`` | PhiMoE at inference: best, then second best of l + b | masked softmax around each chosen logit |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import LprError

Convention = Literal["softmax", "sigmoid", "topk_softmax", "topk_sigmoid", "llama4", "sparsemixer"]
Setting = str | float | bool | int  # a config attribute name, or the value itself


def setting(config: Any, value: Setting, default: Any = None) -> Any:
    """A family setting: a config attribute's value when ``value`` names one, else ``value`` itself."""
    if isinstance(value, str):
        found = getattr(config, value, default)
        return default if found is None else found
    return value


@dataclass(frozen=True)
class Family:
    """One MoE family: its router contract and weight convention (see the module docstring)."""

    model_type: str  # transformers' config.model_type
    name: str  # what people call it
    convention: Convention
    weights: str  # the convention in words (recorded in the states store)
    experts: str = "num_experts"  # config attribute: number of routed experts
    top_k: str = "num_experts_per_tok"  # config attribute: experts per token
    renormalize: Setting = "norm_topk_prob"  # renormalise the chosen weights to sum to 1
    renorm_eps: float = 0.0  # added to the denominator (DeepSeek-V3: 1e-20)
    renorm_min: Setting = 0.0  # the denominator is clamped to at least this (Ernie: moe_norm_min)
    scaling: Setting = 1.0  # the weights are multiplied by this (routed_scaling_factor)
    groups: tuple[str, str] | None = None  # config attributes (number of groups, groups kept) for group-limited top-k
    group_score: Literal["top2", "max"] = "top2"  # how a group is ranked: sum of its best two, or its best
    group_switch: tuple[str, str] | None = None  # groups apply only when config.<attr> == value (DeepSeek-V2)
    logits_fp32: bool = False  # the router computes its logits in float32 whatever the model's dtype
    weights_dtype: Literal["logits", "float32", "input"] = "logits"  # dtype of the weights it returns
    jitter: str | None = None  # config attribute with PhiMoE's sparsemixer threshold
    gate: str = "weight"  # the router's (E, H) weight, as an attribute path from the router
    logit_bias: str | None = None  # a per-expert bias added to the logits (GPT-OSS)
    choice_bias: str | None = None  # the per-expert choice bias; "^name" = held by the MoE block that holds the router
    returns: Literal["triple", "scores_logits"] = "triple"
    receives: str = "x [T, H]"  # what the router is called with, in words (for the compatibility matrix)
    tiny: dict[str, Any] = field(default_factory=dict, compare=False)  # extra config for a tiny test model

    def num_experts(self, config: Any) -> int:
        return self._per_model(config, self.experts, "number of experts")

    def num_top_k(self, config: Any) -> int:
        return self._per_model(config, self.top_k, "top-k")

    def _per_model(self, config: Any, attribute: str, what: str) -> int:
        """One value for every MoE layer (HunYuan's config may hold a list, one value per layer)."""
        value = setting(config, attribute)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise LprError(
                    f"{self.name} with a different {what} per layer ({attribute}={value}) is not supported",
                    f"use a checkpoint with one {what} for every layer",
                )
            value = value[0]
        return int(value)

    def renormalizes(self, config: Any) -> bool:
        return bool(setting(config, self.renormalize, False))

    def group_setting(self, config: Any) -> tuple[int, int]:
        """(number of groups, groups kept); (1, 1) when the family or this config does not limit groups."""
        if self.groups is None:
            return 1, 1
        if self.group_switch is not None and getattr(config, self.group_switch[0], None) != self.group_switch[1]:
            return 1, 1
        return int(setting(config, self.groups[0], 1)), int(setting(config, self.groups[1], 1))

    def gate_tensors(
        self, router: nn.Module, block: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The original router's gate weight (E, H), logit bias (E,) or None, choice bias (E,) or None."""
        weight = _resolve(router, self.gate)
        logit_bias = _resolve(router, self.logit_bias) if self.logit_bias else None
        choice_bias = None
        if self.choice_bias:
            owner, path = (
                (block, self.choice_bias[1:]) if self.choice_bias.startswith("^") else (router, self.choice_bias)
            )
            found = _resolve(owner, path) if owner is not None else None
            choice_bias = None if found is None else found.detach().reshape(-1)
        return weight.detach(), None if logit_bias is None else logit_bias.detach(), choice_bias


def _resolve(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
    return module
