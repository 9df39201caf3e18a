"""In-model bias calibration: each router's choice bias set so that its top-k slots are balanced on
the inputs it actually gets inside the model.

Layer by layer in model order: layer l is calibrated on the hidden states it receives while every
earlier router already routes with its calibrated bias (re-routing upstream changes what downstream
routers see, so calibrating each layer on the original model's stored states leaves later layers
off balance). The forward pass stops at the layer being calibrated, so calibrating L layers costs
about L/2 full passes over the calibration sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.data.corpus import sample_sequences
from pipeline.moe.loading import find_routers
from pipeline.progress import progress_bar
from pipeline.router.from_clusters import calibrate_bias
from pipeline.router.lpr import LatentPrototypeRouter


@dataclass
class TrainingSequences:
    """Training-side sequences (n, seq_len) int64, drawn from many documents, never the held-out ones."""

    calibration: torch.Tensor  # the final bias calibration (distill.calibration_sequences)
    val: torch.Tensor  # early stopping of the model-level phase (distill.model_val_sequences)
    train: torch.Tensor  # the model-level phase (up to model_steps · model_batch_sequences)


def training_sequences(cfg: RunConfig, tokenizer) -> TrainingSequences:
    """The same draw for every caller with the same config (seeded), so the bias baseline is
    calibrated on exactly the sequences the LPR routers are calibrated on. The calibration and
    validation sequences are drawn first and do not depend on ``distill.model_steps`` (otherwise
    the bias baseline would move with the distillation budget)."""
    d = cfg.distill
    held_apart = d.calibration_sequences + d.model_val_sequences
    apart, train = sample_sequences(
        cfg.corpus,
        tokenizer,
        counts=(held_apart, d.model_steps * d.model_batch_sequences),
        minimum=held_apart + (d.model_batch_sequences if d.model_steps > 0 else 0),
        seed=cfg.seed + 2000,
    )
    calibration, val = np.split(apart, [d.calibration_sequences])
    return TrainingSequences(torch.from_numpy(calibration), torch.from_numpy(val), torch.from_numpy(train))


class _StopForward(Exception):
    """Raised by the capture hook once the layer being calibrated has seen its input."""


def at_router_input(
    model: nn.Module, router: nn.Module, ids: torch.Tensor, batch: int, use: Callable[[torch.Tensor], None]
) -> None:
    """Call ``use(x)`` with the router's input x (T, H) inside the model, batch by batch over the sequences
    ids (n, S); each forward pass stops at the router (later layers are not run)."""

    def capture(module: nn.Module, args: tuple) -> None:
        use(args[0].reshape(-1, args[0].shape[-1]))
        raise _StopForward

    handle = router.register_forward_pre_hook(capture)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch):
                with contextlib.suppress(_StopForward):
                    model(ids[start : start + batch].to(device), use_cache=False)
    finally:
        handle.remove()


def router_logits(model: nn.Module, router: LatentPrototypeRouter, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Bias-free logits (n·S, E) float32 of the router on its inputs inside the model over the sequences
    ids (n, S): n·S·E floats kept, not the n·S·H hidden states."""
    logits: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> None:
        logits.append(router.scores(x.to(router.encoder.weight.dtype)).float().cpu())

    at_router_input(model, router, ids, batch, keep)
    return torch.cat(logits)


def calibrate_in_model(
    model: nn.Module, ids: torch.Tensor, *, batch: int = 16, quiet: bool = False
) -> dict[str, dict[str, Any]]:
    """Calibrate the bias of every LPR router installed in ``model`` on the sequences ids (n, S), in
    layer order. Returns per router module name the calibration figures (rows, min/max slots).
    ``quiet`` drops the progress bar (when called inside another stage's bar)."""
    sites = [site for site in find_routers(model) if isinstance(site.module, LatentPrototypeRouter)]
    results = {}
    with contextlib.nullcontext(None) if quiet else progress_bar("calibrate bias in the model", len(sites)) as bar:
        for site in sites:  # calibrate_bias zeroes the bias first; a router's own bias never changes its input
            results[site.name] = calibrate_bias(site.module, router_logits(model, site.module, ids, batch))
            if bar is not None:
                bar.advance(1, note=site.name)
    return results
