"""Routing variants: each is one function that returns the routers to swap into the loaded model.

A variant builder gets the run's config, the run directory and the model *with its original
routers in place*, and returns ``{router module name: LatentPrototypeRouter}`` (empty: keep the
original gates) plus a few figures about how it was made. Registering a new variant is one
decorated function::

    @variant("my-variant", needs="cluster")
    def my_variant(cfg, run, model) -> Built: ...

Every calibration a variant does reads the run's stored rows (the dump: train-split documents),
never the held-out documents it is evaluated on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.moe.checkpoint_keys import local_checkpoint
from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.loading import find_routers, load_tokenizer, resolve_model_path
from pipeline.router.from_clusters import build_init_routers
from pipeline.router.install import gate_routers, install_routers, swap_modules
from pipeline.router.load import distilled_routers
from pipeline.router.lpr import LatentPrototypeRouter, spec_for
from pipeline.router.provenance import distilled_from
from pipeline.router.shipped import checkpoint_routers, drop_in_routers, shipped_routers
from storage.rundir import RunDir
from storage.versions import served_version


@dataclass
class Built:
    """What a variant builder returns."""

    routers: dict[str, LatentPrototypeRouter]  # keyed by router module name; {} keeps the original gates
    info: dict[str, Any] = field(default_factory=dict)  # how it was made (calibration rows, per-layer figures)


Builder = Callable[[RunConfig, RunDir, nn.Module], Built]


@dataclass(frozen=True)
class Variant:
    name: str
    build: Builder
    needs: str | None  # the stage whose output the variant reads (None: only the model)
    description: str


VARIANTS: dict[str, Variant] = {}


def variant(name: str, *, needs: str | None = None) -> Callable[[Builder], Builder]:
    """Register ``build`` under ``name``; its docstring's first line describes it in the report."""

    def register(build: Builder) -> Builder:
        doc = (build.__doc__ or name).strip().splitlines()[0]
        VARIANTS[name] = Variant(name=name, build=build, needs=needs, description=doc)
        return build

    return register


@variant("original")
def original(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """The model's own gates, unchanged."""
    return Built({})


def bias_routers(cfg: RunConfig, run: RunDir, model: nn.Module) -> tuple[dict[str, LatentPrototypeRouter], dict]:
    """The original gates as LPRs equal to them (``gate_routers``: the gate's own weights and biases) with a choice-only
    per-expert bias that balances top-k slots, calibrated in the model layer by layer on the same
    training-side sequences as the LPR routers' final calibration (never the held-out documents).

    The loss-free-balancing baseline: weights stay the gate's own probabilities, only the choice moves.
    """
    from pipeline.router.calibrate import calibrate_in_model, training_sequences

    routers = gate_routers(model)
    calibration = training_sequences(cfg, load_tokenizer(cfg.model, resolve_model_path(cfg))).calibration
    originals = {site.name: site.module for site in find_routers(model)}
    install_routers(model, routers)
    try:
        info = calibrate_in_model(model, calibration, batch=cfg.distill.model_batch_sequences)
    finally:
        swap_modules(model, originals)  # the builder hands the model back with its own gates
    return routers, info


@variant("original+bias", needs="dump")
def original_plus_bias(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """The original gates plus a per-expert balancing bias calibrated in the model (loss-free balancing)."""
    routers, info = bias_routers(cfg, run, model)
    return Built(routers, {"calibration": info})


@variant("lpr-init", needs="cluster")
def lpr_init(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """LPR from the clusters (PCA encoder, matched centroids), calibrated, not distilled."""
    routers, metrics = build_init_routers(cfg, run)
    return Built(routers, {"calibration": metrics})


@variant("lpr", needs="distill")
def lpr(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """LPR as the distill stage stored it (or its served recalibrated version)."""
    routers, metrics = distilled_routers(run)
    return Built(routers, {"distill": metrics, "init": distilled_from(metrics), "version": served_version(run)})


@variant("native", needs="distill")
def native(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """The distilled routers in the family's own tensors, as `export --checkpoint` ships them (folded, stored dtype)."""
    routers, metrics, origin = drop_in_routers(run, FAMILIES[family_of(model.config)])
    source = local_checkpoint(resolve_model_path(cfg), cfg.model.revision)
    info = {"distill": metrics, "init": distilled_from(metrics), "version": served_version(origin), "run": origin.url}
    return Built(shipped_routers(routers, model, source), info)


@variant("checkpoint")
def checkpoint(cfg: RunConfig, run: RunDir, model: nn.Module) -> Built:
    """The router tensors of the exported checkpoint validate.checkpoint (`validate --checkpoint DIR`), as shipped."""
    if not cfg.validate.checkpoint:
        raise LprError("the checkpoint variant needs validate.checkpoint", "pass --checkpoint DIR to validate")
    source = local_checkpoint(resolve_model_path(cfg), cfg.model.revision)
    return Built(checkpoint_routers(cfg.validate.checkpoint, model, source), {"directory": cfg.validate.checkpoint})


def check_variants(names: list[str], run: RunDir) -> None:
    """Every name is registered and every stage the variants read is complete; one error lists all problems."""
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise LprError(
            f"unknown routing variant(s) {', '.join(map(repr, unknown))}",
            f"set validate.variants to some of: {', '.join(VARIANTS)}",
        )
    missing = {VARIANTS[n].needs for n in names if VARIANTS[n].needs and not run.is_complete(VARIANTS[n].needs)}
    if missing:
        need = ", ".join(sorted(missing))
        stages = " and ".join(f"`lpr-distill {stage} RUN_DIR`" for stage in sorted(missing))
        raise LprError(
            f"run directory {run.url} has no complete {need} stage, which validate.variants needs",
            f"run {stages} first, or drop those variants from validate.variants",
        )


def check_fit(name: str, model: nn.Module, routers: dict[str, LatentPrototypeRouter]) -> None:
    """Routers made for another model (names, hidden size, experts, top-k) are a one-line error."""
    sites = {site.name for site in find_routers(model)}
    expected = spec_for(model.config, latent_dim=1)
    problems = []
    if routers and set(routers) != sites:
        problems.append(f"routers for {sorted(routers)[:2]}… ({len(routers)}) ≠ the model's {len(sites)} MoE layers")
    for router in routers.values():
        spec = router.spec
        for what, mine, theirs in (
            ("hidden size", spec.hidden_size, expected.hidden_size),
            ("experts", spec.num_experts, expected.num_experts),
            ("top-k", spec.top_k, expected.top_k),
        ):
            if mine != theirs:
                problems.append(f"{what} {mine} ≠ the model's {theirs}")
        if problems:
            break
    if problems:
        raise LprError(
            f"the {name} routers do not fit the model: {'; '.join(problems)}",
            "set model.path to the model the run was made with, or redo the run for this model",
        )


class VariantSwitcher:
    """One loaded model, switched between variants: the original gates are kept to restore them
    (and to be the teacher that each variant's top-k choices are compared with)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals: dict[str, nn.Module] = {site.name: site.module for site in find_routers(model)}

    def restore(self) -> nn.Module:
        swap_modules(self.model, self.originals)
        return self.model

    def apply(self, name: str, cfg: RunConfig, run: RunDir) -> Built:
        """Put variant ``name``'s routers into the model (after restoring the original gates)."""
        self.restore()
        built = VARIANTS[name].build(cfg, run, self.model)
        check_fit(name, self.model, built.routers)
        if built.routers:
            install_routers(self.model, built.routers)
        return built


def scale_bias(routers: dict[str, LatentPrototypeRouter], calibrated: dict[str, torch.Tensor], strength: float) -> None:
    """Set each router's choice bias to ``strength`` × its calibrated bias (E,): 0 = no bias, 1 = calibrated."""
    with torch.no_grad():
        for name, router in routers.items():
            router.bias.copy_(calibrated[name] * strength)
