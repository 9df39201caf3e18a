"""Export routers to a directory that loads into the model with one call, and ``load_lpr_model``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.families import family_of
from pipeline.init_routers import calibrate_bias, initial_router, row_logits
from pipeline.models import find_routers, load_config, resolve_model_path
from pipeline.progress import info
from pipeline.replace import install_routers
from pipeline.router import LatentPrototypeRouter, RouterSpec, spec_for
from pipeline.stages import check_states_model, distilled_from
from storage.routers import read_routers, write_routers
from storage.routers_store import read_layer_router
from storage.rundir import RunDir
from storage.states import StatesReader

CARD = """# LPR routers for {model}

{kind} Latent Prototype Routers for the {layers} MoE layers of `{model}` ({family}, {experts} experts,
top-{top_k}), made by lpr-distill {version} on {date}, starting from {init}. Similarity: {similarity}, latent
dimension {latent_dim}.

```python
from pipeline import load_lpr_model
model = load_lpr_model("{model_path}", "{out}")
```

Per layer (calibration rows): {metrics}
"""


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


def export_routers(
    routers: dict[str, LatentPrototypeRouter], out: str | Path, *, cfg: RunConfig, kind: str, metrics: dict[str, Any]
) -> Path:
    """Write every router's parameters (keys ``<module>.<parameter>``) and the config that rebuilds them."""
    model_path = resolve_model_path(cfg)
    model_config = load_config(cfg.model, model_path)
    spec = next(iter(routers.values())).spec
    init = distilled_from(metrics)
    tensors = {f"{name}.{key}": value for name, router in routers.items() for key, value in router.state_dict().items()}
    config = {
        "kind": kind,
        "init": init,
        "family": family_of(model_config),
        "model": cfg.model.path,
        "revision": cfg.model.revision,
        "hidden_size": spec.hidden_size,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "spec": spec.to_dict(),
        "routers": list(routers),
        "metrics": metrics,
        "package_version": __version__,
    }
    card = CARD.format(
        model=cfg.model.path,
        model_path=model_path,
        kind={"lpr-init": "Initialised (not distilled)", "lpr": "Distilled"}.get(kind, kind),
        layers=len(routers),
        family=family_of(model_config),
        experts=spec.num_experts,
        top_k=spec.top_k,
        version=__version__,
        date=time.strftime("%Y-%m-%d"),
        init={"gate": "the model's own gates", "clusters": "the balanced clusters"}[init],
        similarity=spec.similarity,
        latent_dim=spec.latent_dim,
        out=out,
        metrics="; ".join(f"{layer}: {value}" for layer, value in metrics.items()),
    )
    return write_routers(out, tensors, config, card)


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


def distilled_routers(run: RunDir) -> tuple[dict[str, LatentPrototypeRouter], dict[str, Any]]:
    """The distill stage's routers keyed by router module name, and their held-out figures."""
    if not run.is_complete("distill"):
        raise LprError(
            f"no distilled routers in {run.url}",
            "run `lpr-distill distill RUN_DIR` first, or pass --init-only for routers from the clusters",
        )
    directory = run.output_path("distill")
    routers, metrics = {}, {}
    for layer in run.read_manifest("distill").outputs["layers"]:
        state, meta = read_layer_router(run, directory, layer)
        router = LatentPrototypeRouter(RouterSpec(**meta["spec"]))
        router.load_state_dict(state, strict=True)
        routers[meta["module"]] = router.eval()
        metrics[layer] = meta["summary"]
    return routers, metrics


def run_export(*, cfg: RunConfig, run: RunDir, out: str | Path) -> Path:
    """Export the distilled routers to ``out``."""
    check_states_model(cfg, run)
    routers, metrics = distilled_routers(run)
    path = export_routers(routers, out, cfg=cfg, kind="lpr", metrics=metrics)
    info(f"[bold]export[/]: {len(routers)} distilled LPR routers → {path}")
    return path


def run_export_init(*, cfg: RunConfig, run: RunDir, out: str | Path) -> Path:
    """Export LPR-init routers (from the cluster stage, calibrated) to ``out``."""
    check_states_model(cfg, run)
    routers, metrics = build_init_routers(cfg, run)
    path = export_routers(routers, out, cfg=cfg, kind="lpr-init", metrics=metrics)
    info(f"[bold]export[/]: {len(routers)} LPR-init routers → {path}")
    return path
