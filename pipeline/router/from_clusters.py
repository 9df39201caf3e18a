"""LPR-init: routers built from the cluster stage alone (no distillation), calibrated on stored rows.

Encoder = the PCA basis (``z = components · (x − mean)``), prototype of expert e = the centroid of
the cluster matched to e. Then, on calibration rows drawn as whole chunks from many documents:
the temperature is set so that the router's mean top-1 weight equals the teacher's (the experts
see weights on the scale they were trained with; for a sigmoid router the mean top-1 *score*, since
its renormalised weights are even both when the logits are flat and when they saturate), and the
per-expert bias is the negated price of
an exactly balanced top-k assignment of the router's probabilities — every expert gets the same
number of slots on the calibration rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.clustering.auction import auction
from pipeline.clustering.sampling import sample_ranges
from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.moe.loading import load_config, resolve_model_path
from pipeline.router.lpr import LatentPrototypeRouter, RouterSpec, spec_for
from storage.prototypes import read_layer
from storage.rundir import RunDir
from storage.states import StatesReader


def router_from_prototypes(tensors: dict[str, np.ndarray], spec: RouterSpec) -> LatentPrototypeRouter:
    """tensors: one layer of ``prototypes/`` (mean (H,), components (d, H), centroids (E, d), ...)."""
    router = LatentPrototypeRouter(spec)
    components = torch.from_numpy(tensors["components"]).float()
    mean = torch.from_numpy(tensors["mean"]).float()
    with torch.no_grad():
        router.encoder.weight.copy_(components)
        router.encoder.bias.copy_(-(components @ mean))
        router.prototypes.copy_(torch.from_numpy(tensors["centroids"][tensors["cluster_of_expert"]]).float())
    return router


SIGMOID_SCORED = ("sigmoid", "topk_sigmoid", "llama4")  # conventions whose scores are sigmoid(logits)


def top1(logits: torch.Tensor, weights: torch.Tensor, convention: str) -> torch.Tensor:
    """Per row (n,), what the temperature is calibrated on: the largest routing weight of ``weights`` (n, k)
    (the largest, not the first: a family may return its top-k unsorted, DeepSeek-V3's
    ``topk(sorted=False)``), or for a sigmoid-scored router the largest sigmoid score of ``logits`` (n, E):
    its renormalised weights are not monotonic in the temperature."""
    if convention in SIGMOID_SCORED:
        return logits.float().sigmoid().max(-1).values
    return weights.float().max(-1).values


def teacher_top1(reader: StatesReader, layer: str, ranges: list[tuple[int, int]], convention: str) -> float:
    """The gate's mean ``top1`` over the stored rows in ``ranges``."""
    total = 0.0
    for a, b in ranges:
        logits, weights = (torch.from_numpy(reader.read(name, a, b, layer=layer)) for name in ("logits", "topk_w"))
        total += float(top1(logits, weights, convention).double().sum())
    return total / max(1, sum(b - a for a, b in ranges))


def encode_rows(
    router: LatentPrototypeRouter, reader: StatesReader, layer: str, ranges: list[tuple[int, int]]
) -> torch.Tensor:
    """Latents (n, d) float32 of the rows in ``ranges``, read one chunk at a time (memory ∝ n·d, not n·H)."""
    with torch.no_grad():
        return torch.cat([router.encode(reader.read_x(layer, a, b).float())[0] for a, b in ranges])


def row_logits(
    router: LatentPrototypeRouter, reader: StatesReader, layer: str, ranges: list[tuple[int, int]]
) -> torch.Tensor:
    """Router logits (n, E) of the rows in ``ranges``, read one chunk at a time (memory ∝ n·E)."""
    with torch.no_grad():
        return torch.cat([router.scores(reader.read_x(layer, a, b).float()) for a, b in ranges])


def calibrate_temperature(router: LatentPrototypeRouter, z: torch.Tensor, target_top1: float) -> float:
    """Bisection on log-temperature so that the router's mean ``top1`` matches the teacher's."""
    if router.spec.similarity in ("dot", "mahalanobis"):
        return float("nan")  # no temperature in these similarities
    z = z[:: max(1, len(z) // 65_536)]
    low, high = math.log(1e-3), math.log(1e4)
    with torch.no_grad():
        for _ in range(40):
            middle = (low + high) / 2
            router.log_temperature.fill_(middle)
            logits = router.latent_scores(z)
            weights, _ = router.route(logits)
            if float(top1(logits, weights, router.spec.convention).mean()) < target_top1:
                low = middle
            else:
                high = middle
    return math.exp(router.log_temperature.item())


def calibrate_bias(router: LatentPrototypeRouter, logits: torch.Tensor) -> dict[str, Any]:
    """Set the choice bias so that the top-k slots of the router logits (n, E) are balanced (up to
    near-ties). The logits (``router.scores``, bias-free) rather than the latents or inputs: n·E floats,
    not n·d or n·H (the bias baseline's identity routers have d = H, the model's hidden size)."""
    with torch.no_grad():
        router.bias.zero_()
        scores = router.choice_scores(logits).numpy()  # what the family ranks experts by
    k = router.spec.top_k
    scale = float(np.abs(scores).mean()) or 1.0
    schedule = [scale * 0.1 / 5**t for t in range(6)] + [scale * 1e-6]
    _, prices, _ = auction(-scores, kp=k, prices=np.zeros(scores.shape[1]), eps_schedule=schedule)
    with torch.no_grad():
        router.bias.copy_(torch.from_numpy(-(prices - prices.mean())).float())
        slots = refine_bias(router, logits, step=scale * 0.1)
    return {"calibration_rows": int(logits.shape[0]), "slots_min": int(slots.min()), "slots_max": int(slots.max())}


def refine_bias(router: LatentPrototypeRouter, logits: torch.Tensor, *, step: float, rounds: int = 60) -> np.ndarray:
    """Correct the bias where the family's choice is not a plain top-k of score + bias, so the auction's
    prices do not balance it exactly (DeepSeek's group-limited top-k, PhiMoE's sparsemixer): rounds of
    bias −= step · (slots / mean − 1) with a shrinking step, keeping the most even bias seen. A no-op when
    the auction's bias is balanced already (up to near-ties). logits (T, E) → slots per expert (E,)."""
    experts = logits.shape[1]

    def slots_now() -> np.ndarray:
        return np.bincount(router.route(logits)[1].numpy().reshape(-1), minlength=experts)

    slots = slots_now()
    best_spread, best_bias, best_slots = int(slots.max() - slots.min()), router.bias.clone(), slots
    tolerance = max(2, int(0.002 * slots.mean()))
    for _ in range(rounds):
        if best_spread <= tolerance:
            break
        router.bias.sub_(step * torch.from_numpy(slots / slots.mean() - 1.0).float())
        router.bias.sub_(router.bias.mean())
        step *= 0.93
        slots = slots_now()
        if slots.max() - slots.min() < best_spread:
            best_spread, best_bias, best_slots = int(slots.max() - slots.min()), router.bias.clone(), slots
    router.bias.copy_(best_bias)
    return best_slots


@dataclass
class InitialRouter:
    router: LatentPrototypeRouter  # LPR-init, temperature calibrated, bias still zero
    meta: dict[str, Any]  # the layer's prototype metadata (module, layer_index, ...)
    calibration: list[tuple[int, int]]  # the chunks to calibrate the bias on (after any training)
    temperature: float  # NaN for similarities without one


def initial_router(
    *, cfg: RunConfig, run: RunDir, reader: StatesReader, layer: str, model_config: Any
) -> InitialRouter:
    """One layer's LPR-init from ``prototypes/``, its temperature calibrated on stored rows."""
    tensors, meta = read_layer(run, run.output_path("cluster"), layer)
    spec = spec_for(model_config, latent_dim=int(meta["latent_dim"]), similarity=cfg.router.similarity)
    made_for = (tensors["components"].shape[1], tensors["centroids"].shape[0])
    if made_for != (spec.hidden_size, spec.num_experts):
        raise LprError(
            f"the prototypes in {run.url} were made for hidden size {made_for[0]} and {made_for[1]} experts, "
            f"but the configured model ({cfg.model.path}) has {spec.hidden_size} and {spec.num_experts}",
            "pass the model the run was dumped with (--set model.path=...)",
        )
    router = router_from_prototypes(tensors, spec)
    # other chunks than the clustering sample, where the store has them
    seed = cfg.seed + meta["layer_index"] + 1000
    ranges = sample_ranges(reader.num_rows, reader.chunk_rows, cfg.router.calibration_rows, seed)
    z = encode_rows(router, reader, layer, ranges)
    temperature = calibrate_temperature(router, z, teacher_top1(reader, layer, ranges, spec.convention))
    return InitialRouter(router, meta, ranges, temperature)


def build_init_routers(cfg: RunConfig, run: RunDir) -> tuple[dict[str, LatentPrototypeRouter], dict[str, Any]]:
    """LPR-init routers keyed by router module name, from ``prototypes/`` and calibration rows."""
    if not run.is_complete("cluster"):
        raise LprError(f"no complete prototypes in {run.url}", "run `lpr-distill cluster RUN_DIR` first")
    model_config = load_config(cfg.model, resolve_model_path(cfg))
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    routers, metrics = {}, {}
    for layer in reader.layers:
        init = initial_router(cfg=cfg, run=run, reader=reader, layer=layer, model_config=model_config)
        balance = calibrate_bias(init.router, row_logits(init.router, reader, layer, init.calibration))
        metrics[layer] = {"temperature": init.temperature, **balance}
        routers[init.meta["module"]] = init.router
    return routers, metrics
