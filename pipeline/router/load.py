"""Routers back into a model: ``load_lpr_model`` for exported routers, ``distilled_routers`` for a
run's distill stage output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import LprError
from pipeline.moe.families import family_of
from pipeline.moe.loading import find_routers
from pipeline.progress import info
from pipeline.router.install import install_routers
from pipeline.router.lpr import LatentPrototypeRouter, RouterSpec, spec_for
from storage.routers import read_routers
from storage.routers_store import read_layer_router
from storage.rundir import RunDir
from storage.versions import served_version, version_path


def convention(spec: RouterSpec) -> str:
    """The family weight convention a spec routes by, in words (what ``route`` does with the logits)."""
    fields = ("convention", "renormalize", "scaling", "n_group", "topk_group", "group_score", "jitter_eps", "returns")
    return ", ".join(f"{name}={getattr(spec, name)}" for name in fields)


def load_lpr_model(model_or_path: nn.Module | str | Path, routers_dir: str | Path, **from_pretrained: Any) -> nn.Module:
    """The transformers model with every router replaced by the exported LPR routers.

    ``model_or_path``: a loaded model, or a path / hub id for ``AutoModelForCausalLM.from_pretrained``
    (keyword arguments are passed on). Routers made for another model are a one-line error.
    """
    tensors, config = read_routers(routers_dir)
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained)
    spec = RouterSpec(**config["spec"])
    expected = spec_for(model.config, latent_dim=spec.latent_dim, similarity=spec.similarity)
    problems = [
        f"{what} {mine} ≠ the model's {theirs}"
        for what, mine, theirs in (
            ("family", config["family"], family_of(model.config)),
            ("hidden size", spec.hidden_size, expected.hidden_size),
            ("experts", spec.num_experts, expected.num_experts),
            ("top-k", spec.top_k, expected.top_k),
            ("weight convention", convention(spec), convention(expected)),
        )
        if mine != theirs
    ]
    sites = [site.name for site in find_routers(model)]
    if not problems and sorted(config["routers"]) != sorted(sites):
        problems.append(f"routers for {len(config['routers'])} MoE layers ≠ the model's {len(sites)}")
    if problems:
        raise LprError(
            f"routers in {routers_dir} were made for another model: {'; '.join(problems)}",
            f"export routers for this model (they were made for {config['model']})",
        )
    routers = {}
    for name in config["routers"]:
        router = LatentPrototypeRouter(spec)
        state = {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + ".")}
        router.load_state_dict(state, strict=True)
        routers[name] = router.eval()
    install_routers(model, routers)
    info(f"loaded {len(routers)} LPR routers ({config['kind']}) into {type(model).__name__}")
    return model


def distilled_routers(
    run: RunDir, version: int | None = None
) -> tuple[dict[str, LatentPrototypeRouter], dict[str, Any]]:
    """The distilled routers keyed by router module name, and their per-layer figures: the served
    version (``version`` None), or the given one (0: the distill stage's own)."""
    if not run.is_complete("distill"):
        raise LprError(
            f"no distilled routers in {run.url}",
            "run `lpr-distill distill RUN_DIR` first, or pass --init-only for routers from the clusters",
        )
    directory = version_path(run, served_version(run) if version is None else version)
    routers, metrics = {}, {}
    for layer in run.read_manifest("distill").outputs["layers"]:
        found = read_layer_router(run, directory, layer)
        if found is None:
            raise LprError(f"routers version in {directory} has no complete {layer}", "recalibrate again")
        state, meta = found
        router = LatentPrototypeRouter(RouterSpec(**meta["spec"]))
        router.load_state_dict(state, strict=True)
        routers[meta["module"]] = router.eval()
        metrics[layer] = meta["summary"]
    return routers, metrics
