"""The Latent Prototype Router: encode the router input, compare it with one prototype per expert.

``z = encoder(x)`` (linear, initialised from the PCA basis; optionally variational, routing on the
mean), then one score per expert from a similarity between ``z`` and that expert's prototype:

* ``cosine`` (default): ``exp(log_temperature) · cos(z, p_e)``
* ``dot``: ``z · p_e`` — with an identity encoder and the gate's weight as prototypes this *is* the
  original linear gate, so the LPR generalises it
* ``gaussian``: ``−exp(log_temperature) · ‖z − p_e‖² / 2``
* ``mahalanobis``: ``−Σ_d exp(log_precision_d) (z_d − p_ed)² / 2`` (a learned diagonal)

The scores are the router logits; the weights follow the convention of the family the router
replaces (softmax → top-k → renormalise or not, fp32 or the logits' dtype), so the experts see
weights on the scale they were trained with. A per-expert ``bias`` moves only the *choice* of
experts (the loss-free-balancing way): indices are the top-k of ``probabilities + bias``, weights
come from the unbiased probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's weight convention, with the bias on the choice only → (weights, indices)."""
        probs = torch.softmax(logits.float(), dim=-1)
        indices = torch.topk(probs + self.bias.float(), self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        if self.spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.spec.weights_fp32:
            weights = weights.to(logits.dtype)
        return weights, indices

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim).to(self.encoder.weight.dtype)
        logits = self.scores(x).to(hidden_states.dtype)
        weights, indices = self.route(logits)
        return logits, weights, indices


def spec_for(config: object, *, latent_dim: int, similarity: Similarity = "cosine") -> RouterSpec:
    """The router spec that fits a transformers config of a supported family."""
    from pipeline.families import FAMILIES, family_of

    family = FAMILIES[family_of(config)]
    return RouterSpec(
        hidden_size=int(config.hidden_size),
        num_experts=family.num_experts(config),
        top_k=int(config.num_experts_per_tok),
        latent_dim=latent_dim,
        similarity=similarity,
        renormalize=family.renormalizes(config),
        weights_fp32=family.weights_fp32,
    )


def identity_router(gate_weight: torch.Tensor, spec: RouterSpec) -> LatentPrototypeRouter:
    """The LPR that equals a linear gate: identity encoder, dot product, prototypes = gate weight (E, H)."""
    router = LatentPrototypeRouter(spec)
    with torch.no_grad():
        router.encoder.weight.copy_(torch.eye(spec.hidden_size, dtype=router.encoder.weight.dtype))
        router.encoder.bias.zero_()
        router.prototypes.copy_(gate_weight.detach().to(router.prototypes.dtype))
    return router
