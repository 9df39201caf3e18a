"""The Latent Prototype Router: encode the router input, compare it with one prototype per expert.

``z = encoder(x)`` (linear, initialised from the PCA basis; optionally variational, routing on the
mean), then one score per expert from a similarity between ``z`` and that expert's prototype:

* ``cosine`` (default): ``exp(log_temperature) · cos(z, p_e)``
* ``dot``: ``z · p_e`` — with an identity encoder and the gate's weight as prototypes this *is* the
  original linear gate, so the LPR generalises it
* ``gaussian``: ``−exp(log_temperature) · ‖z − p_e‖² / 2``
* ``mahalanobis``: ``−Σ_d exp(log_precision_d) (z_d − p_ed)² / 2`` (a learned diagonal)

The scores are the router logits; the weights follow the convention of the family the router
replaces (``pipeline.moe.families``: softmax or sigmoid → (group-limited) top-k → renormalise or not
→ × scale; top-k → softmax or sigmoid over the k; Llama 4's dense scores; PhiMoE's sparsemixer),
in that family's dtypes, so the experts see weights on the scale they were trained with. A
per-expert ``bias`` moves only the *choice* of experts (the loss-free-balancing way, and exactly
DeepSeek-V3's ``e_score_correction_bias``): indices are the top-k of ``choice_scores(logits) + bias``,
weights come from the unbiased scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Similarity = Literal["cosine", "dot", "gaussian", "mahalanobis"]


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to rebuild a router's shapes and behaviour (saved with exported weights)."""

    hidden_size: int
    num_experts: int
    top_k: int
    latent_dim: int
    similarity: Similarity = "cosine"
    variational: bool = False
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    weights_fp32: bool = False  # keep the weights in float32 (Mixtral) instead of the logits' dtype
    # the family's weight convention (defaults: softmax → top-k, as Qwen3-MoE); see pipeline.moe.families
    convention: str = "softmax"  # softmax | sigmoid | topk_softmax | topk_sigmoid | llama4 | sparsemixer
    renorm_eps: float = 0.0  # added to the renormalising denominator
    renorm_min: float = 0.0  # the renormalising denominator is at least this
    scaling: float = 1.0  # weights × this (routed_scaling_factor)
    n_group: int = 1  # group-limited top-k: experts in n_group groups, the best topk_group groups kept
    topk_group: int = 1
    group_score: str = "top2"  # a group's rank: sum of its best two choice scores (top2) or its best (max)
    jitter_eps: float = 0.0  # sparsemixer's masking threshold
    logits_fp32: bool = False  # logits in float32 whatever the input dtype (else the input's dtype)
    weights_like_input: bool = False  # weights in the input's dtype (Jamba, Granite, Ernie)
    returns: str = "triple"  # triple: (logits, weights, indices); scores_logits: Llama 4's (dense scores, logits)

    def to_dict(self) -> dict:
        return asdict(self)


class LatentPrototypeRouter(nn.Module):
    """x (T, H) or (B, S, H) → (router_logits [T, E], top_k_weights [T, k], top_k_indices [T, k])."""

    def __init__(self, spec: RouterSpec) -> None:
        nn.Module.__init__(self)  # not super(): a swapped-in subclass also inherits the family's router
        self.spec = spec
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.hidden_dim = spec.hidden_size
        self.encoder = nn.Linear(spec.hidden_size, spec.latent_dim)
        self.encoder_logvar = nn.Linear(spec.hidden_size, spec.latent_dim) if spec.variational else None
        self.prototypes = nn.Parameter(torch.randn(spec.num_experts, spec.latent_dim) * spec.latent_dim**-0.5)
        self.log_temperature = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ≈ 10: cosines → logits of useful spread
        self.log_precision = nn.Parameter(torch.zeros(spec.latent_dim))
        self.register_buffer("bias", torch.zeros(spec.num_experts))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, H) → mean (T, d) and, when variational, log-variance (T, d)."""
        mean = self.encoder(x)
        return mean, (self.encoder_logvar(x) if self.encoder_logvar is not None else None)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E) for router inputs (T, H), in the dtype of the parameters."""
        return self.latent_scores(self.encode(x)[0])

    def latent_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E) for latents (T, d)."""
        p = self.prototypes
        similarity = self.spec.similarity
        if similarity == "dot":
            return z @ p.T
        if similarity == "cosine":
            return self.log_temperature.exp() * (F.normalize(z, dim=-1) @ F.normalize(p, dim=-1).T)
        if similarity == "gaussian":
            return -0.5 * self.log_temperature.exp() * torch.cdist(z, p).square()
        precision = self.log_precision.exp()
        return -0.5 * torch.cdist(z * precision.sqrt(), p * precision.sqrt()).square()

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, E) float32: what the family ranks experts by, before the bias (probabilities or logits)."""
        convention = self.spec.convention
        if convention == "softmax":
            return torch.softmax(logits.float(), dim=-1)
        if convention == "sigmoid":
            return torch.sigmoid(logits.float())
        return logits.float()

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's weight convention, with the bias on the choice only: logits (T, E) →
        (weights (T, k), indices (T, k) int64 in [0, E))."""
        spec = self.spec
        if spec.convention == "sparsemixer":
            weights, indices = sparsemixer(logits.float(), self.bias.float(), spec.jitter_eps)
            return weights.to(logits.dtype), indices
        scores = self.choice_scores(logits)
        choice = scores + self.bias.float()
        if spec.n_group > 1:
            choice = limit_groups(choice, spec.n_group, spec.topk_group, spec.group_score)
        indices = torch.topk(choice, self.top_k, dim=-1).indices
        chosen = scores.gather(-1, indices)
        if spec.convention == "topk_softmax":
            weights = torch.softmax(chosen, dim=-1)
        elif spec.convention in ("topk_sigmoid", "llama4"):
            weights = torch.sigmoid(chosen)
        else:
            weights = chosen
        if spec.renormalize and spec.convention not in ("topk_softmax", "llama4"):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps).clamp(min=spec.renorm_min)
        if spec.scaling != 1.0:
            weights = weights * spec.scaling
        if not spec.weights_fp32:
            weights = weights.to(logits.dtype)
        return weights, indices

    def forward(self, hidden_states: torch.Tensor, *block_args: object) -> tuple[torch.Tensor, ...]:
        """x (T, H) or (B, S, H) → the family's output contract. ``block_args`` (a choice bias that
        some MoE blocks pass, e.g. MiniMax-M2) are ignored: the LPR carries its own ``bias``."""
        spec = self.spec
        x = hidden_states.reshape(-1, self.hidden_dim).to(self.encoder.weight.dtype)
        logits = self.scores(x)
        logits = logits.float() if spec.logits_fp32 else logits.to(hidden_states.dtype)
        weights, indices = self.route(logits)
        if spec.weights_like_input:
            weights = weights.to(hidden_states.dtype)
        if spec.returns == "scores_logits":  # Llama 4: dense scores, 0 where an expert is not chosen
            return torch.zeros_like(logits).scatter(1, indices, weights.to(logits.dtype)), logits
        return logits, weights, indices

    def extra_repr(self) -> str:
        spec = self.spec
        shape = f"{spec.hidden_size} → {spec.latent_dim} → {spec.num_experts} experts, top-{spec.top_k}"
        return f"{shape}, {spec.similarity}, {spec.convention}"


def limit_groups(choice: torch.Tensor, n_group: int, topk_group: int, score: str) -> torch.Tensor:
    """Group-limited top-k (DeepSeek): choice (T, E) with every expert outside the ``topk_group``
    best of ``n_group`` equal groups set to −inf. A group ranks by the sum of its best two (top2) or its best (max)."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_group, experts // n_group)
    rank = grouped.topk(2, dim=-1).values.sum(-1) if score == "top2" else grouped.max(dim=-1).values
    keep = torch.zeros(tokens, n_group, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, rank.topk(topk_group, dim=-1).indices, True)
    return choice.masked_fill(~keep.repeat_interleave(experts // n_group, dim=1), float("-inf"))


def sparsemixer(logits: torch.Tensor, bias: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference (top-2): logits (T, E) → (weights (T, 2), indices (T, 2)).

    Each chosen expert's weight is a softmax over the logits within a relative ``2·jitter_eps`` of
    its own logit (the first choice excluded from the second's). The bias moves the choices only.
    """

    def masked_weight(candidates: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        top = candidates.gather(-1, chosen)
        factor = logits.abs().clamp(min=top)
        masked = candidates.masked_fill((top - candidates) / factor > 2 * jitter_eps, float("-inf"))
        return torch.softmax(masked, dim=-1).gather(-1, chosen)

    choice = logits + bias
    first = choice.argmax(dim=-1, keepdim=True)
    rest = logits.scatter(-1, first, float("-inf"))
    second = choice.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
    weights = torch.cat([masked_weight(logits, first), masked_weight(rest, second)], dim=-1)
    return weights, torch.cat([first, second], dim=-1)


def spec_for(config: object, *, latent_dim: int, similarity: Similarity = "cosine") -> RouterSpec:
    """The router spec that fits a transformers config of a supported family (its weight convention included)."""
    from pipeline.moe.families import FAMILIES, family_of, text_config
    from pipeline.moe.family import setting

    family = FAMILIES[family_of(config)]
    config = text_config(config)
    n_group, topk_group = family.group_setting(config)
    return RouterSpec(
        hidden_size=int(config.hidden_size),
        num_experts=family.num_experts(config),
        top_k=family.num_top_k(config),
        latent_dim=latent_dim,
        similarity=similarity,
        renormalize=family.renormalizes(config),
        weights_fp32=family.weights_dtype == "float32",
        convention=family.convention,
        renorm_eps=family.renorm_eps,
        renorm_min=float(setting(config, family.renorm_min, 0.0)),
        scaling=float(setting(config, family.scaling, 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        group_score=family.group_score,
        jitter_eps=float(setting(config, family.jitter, 0.0)) if family.jitter else 0.0,
        logits_fp32=family.logits_fp32,
        weights_like_input=family.weights_dtype == "input",
        returns=family.returns,
    )


def gate_router(
    gate_weight: torch.Tensor,
    spec: RouterSpec,
    *,
    logit_bias: torch.Tensor | None = None,
    choice_bias: torch.Tensor | None = None,
) -> LatentPrototypeRouter:
    """The linear gate as a compact LPR: latent = one dimension per expert, encoder = the gate's weight
    (E, H) and logit bias, prototypes = identity, dot product — the gate's logits at the gate's cost.

    The start of a gate-initialised distillation (``router.init: gate``); ``identity_router`` is the same
    function with an identity encoder (H × H), which the product never needs to carry.
    """
    experts = gate_weight.shape[0]
    router = LatentPrototypeRouter(replace(spec, latent_dim=experts, similarity="dot"))
    with torch.no_grad():
        router.encoder.weight.copy_(gate_weight.detach().to(router.encoder.weight.dtype))
        router.encoder.bias.zero_()
        if logit_bias is not None:
            router.encoder.bias.copy_(logit_bias.detach().reshape(-1).to(router.encoder.bias.dtype))
        router.prototypes.copy_(torch.eye(experts, dtype=router.prototypes.dtype))
        if choice_bias is not None:
            router.bias.copy_(choice_bias.detach().reshape(-1).float())
    return router


def identity_router(
    gate_weight: torch.Tensor | nn.Module,
    spec: RouterSpec,
    *,
    logit_bias: torch.Tensor | None = None,
    choice_bias: torch.Tensor | None = None,
) -> LatentPrototypeRouter:
    """The LPR that equals a linear gate: identity encoder, dot product, prototypes = gate weight (E, H).

    ``logit_bias`` (E,) (GPT-OSS's gate bias) becomes one more latent dimension: the encoder appends
    a constant 1 and the prototypes the bias, so ``z·p_e = x·w_e + b_e``. ``choice_bias`` (E,)
    (DeepSeek-V3's e_score_correction_bias) is the router's choice bias. Given the original router
    module instead of its weight, all three are read from it (a bias that its MoE block holds is
    not: ``pipeline.router.install.identity_routers`` reads those too).
    """
    if isinstance(gate_weight, nn.Module):
        from pipeline.moe.families import family_of_router

        weight, found_logit_bias, found_choice_bias = family_of_router(gate_weight).gate_tensors(gate_weight, None)
        logit_bias = found_logit_bias if logit_bias is None else logit_bias
        choice_bias = found_choice_bias if choice_bias is None else choice_bias
        gate_weight = weight
    hidden = spec.hidden_size
    if logit_bias is not None:
        spec = replace(spec, latent_dim=hidden + 1, similarity="dot")
    router = LatentPrototypeRouter(spec)
    with torch.no_grad():
        router.encoder.weight.zero_()
        router.encoder.weight[:hidden].copy_(torch.eye(hidden, dtype=router.encoder.weight.dtype))
        router.encoder.bias.zero_()
        router.prototypes.zero_()
        router.prototypes[:, :hidden].copy_(gate_weight.detach().to(router.prototypes.dtype))
        if logit_bias is not None:
            router.encoder.bias[hidden] = 1.0
            router.prototypes[:, hidden].copy_(logit_bias.detach().to(router.prototypes.dtype))
        if choice_bias is not None:
            router.bias.copy_(choice_bias.detach().reshape(-1).float())
    return router
