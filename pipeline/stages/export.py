"""The export stage: router weights, their config and a card, in a directory that ``load_lpr_model`` puts
into the model with one call. Exporting the distilled routers writes the stage's manifest (the
recorded directory may lie outside the run directory, with ``--out``)."""

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
from pipeline.stages.protocol import build_manifest, check_states_model
from pipeline.version import __version__
from storage.routers import write_routers
from storage.rundir import RunDir

STAGE = "export"

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
    """Export the distilled routers to ``out``, then write the export manifest (last)."""
    started = time.time()
    check_states_model(cfg, run)
    routers, metrics = distilled_routers(run)
    path = export_routers(routers, out, cfg=cfg, kind="lpr", metrics=metrics)
    distill = run.read_manifest("distill")
    manifest = build_manifest(
        stage=STAGE,
        config={"model": cfg.model.model_dump(mode="json")},
        inputs={"distill": distill.fingerprint if distill else None},
        outputs={"directory": str(Path(path).resolve()), "routers": len(routers), "kind": "lpr"},
        stats={"layers": metrics},
        started=started,
    )
    run.ensure()
    run.write_text(run.manifest_path(STAGE), manifest.model_dump_json(indent=2))
    info(f"[bold]export[/]: {len(routers)} distilled LPR routers → {path}")
    return path


def run_export_init(*, cfg: RunConfig, run: RunDir, out: str | Path) -> Path:
    """Export LPR-init routers (from the cluster stage, calibrated) to ``out``."""
    check_states_model(cfg, run)
    routers, metrics = build_init_routers(cfg, run)
    path = export_routers(routers, out, cfg=cfg, kind="lpr-init", metrics=metrics)
    info(f"[bold]export[/]: {len(routers)} LPR-init routers → {path}")
    return path
