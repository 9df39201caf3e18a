"""Export routers to a directory that loads into the model with one call, and ``load_lpr_model``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.moe.families import family_of
from pipeline.moe.loading import load_config, resolve_model_path
from pipeline.progress import info
from pipeline.router.from_clusters import build_init_routers
from pipeline.router.load import distilled_routers
from pipeline.router.lpr import LatentPrototypeRouter
from pipeline.router.provenance import distilled_from
from pipeline.stages.protocol import check_states_model
from pipeline.version import __version__
from storage.routers import write_routers
from storage.rundir import RunDir

CARD = """# LPR routers for {model}

{kind} Latent Prototype Routers for the {layers} MoE layers of `{model}` ({family}, {experts} experts,
top-{top_k}), made by lpr-distill {version} on {date}, starting from {init}. Similarity: {similarity}, latent
dimension {latent_dim}.

```python
model = load_lpr_model("{model_path}", "{out}")
```

Per layer (calibration rows): {metrics}
"""


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
