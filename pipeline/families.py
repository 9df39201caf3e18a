"""The MoE families the pipeline supports: data, one entry per family.

``weights`` says how the family turns router logits into expert weights (what an LPR router
that replaces it must reproduce). Capture works for any family whose router returns
``(logits [T, E], weights [T, k], indices [T, k])``; the families below are those it is tested on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import LprError


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    weights: str  # weight convention of the original router (recorded in the states store)
    experts_key: str = "num_experts"  # config attribute with the number of experts
    renormalize: str | bool = "norm_topk_prob"  # config attribute, or always/never
    weights_fp32: bool = False  # weights stay float32 instead of the logits' dtype

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.experts_key))

    def renormalizes(self, config: Any) -> bool:
        return bool(getattr(config, self.renormalize, False)) if isinstance(self.renormalize, str) else self.renormalize


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "softmax → top-k → renormalise if norm_topk_prob"),
        Family("qwen2_moe", "softmax → top-k → renormalise if norm_topk_prob"),
        Family("mixtral", "softmax (fp32) → top-k → renormalise", "num_local_experts", True, True),
        Family("olmoe", "softmax → top-k → renormalise if norm_topk_prob"),
    )
}


def family_of(config: Any) -> str:
    """The family key of a transformers config; raises for families not in the table."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return model_type
    supported = ", ".join(sorted(FAMILIES))
    if any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise LprError(f"MoE family '{model_type}' is not supported yet", f"supported families: {supported}")
    raise LprError(
        f"model type '{model_type}' is a dense model with no MoE layer to distil",
        f"point --model at a Mixture-of-Experts checkpoint (supported families: {supported})",
    )
