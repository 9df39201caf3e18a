"""``export --checkpoint``: the served routers written into a complete checkpoint of the original
architecture (``storage.checkpoint``), in the family's own router tensors (``pipeline.router.native``):
stock ``from_pretrained``, and engines that load the family, route as the validated routers do."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.moe.checkpoint_keys import checkpoint_keys, empty_model, local_checkpoint
from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.loading import load_config, resolve_model_path
from pipeline.progress import info
from pipeline.router.native import Routers, check_routers_fit, drop_in_form, fold_routers, state_keys
from pipeline.router.shipped import drop_in_routers
from pipeline.stages.protocol import build_manifest, check_states_model
from pipeline.version import __version__
from storage.checkpoint import check_target, read_layout, write_checkpoint
from storage.rundir import RunDir

STAGE = "export_checkpoint"  # its own manifest, beside the LPR export's


def export_checkpoint(
    routers: Routers,
    source: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out``: the checkpoint ``source`` (a directory or hub id) with every router's tensors
    replaced by ``routers`` (LPRs folded into the family's form, or ``FamilyRouter``s as they are).
    Returns what was written.

    One-line errors, before anything is written: a bad target, routers made for another model, and
    routers the family's tensors cannot express (naming ``router.form: native``)."""
    if "://" in str(out):
        raise LprError(f"--checkpoint {out} is not a local directory", "write the checkpoint to a local path")
    check_target(Path(out))  # first: a bad target fails before any work
    directory = local_checkpoint(str(source), revision)
    config = load_config_at(directory)
    family = FAMILIES[family_of(config)]
    model = empty_model(config)
    check_routers_fit(routers, model, source=source)
    folded = fold_routers(routers, family)
    layout = read_layout(directory)
    keys = checkpoint_keys(model, layout)
    tensors: dict[str, torch.Tensor] = {}
    for site, tensors_of_site in folded.items():
        for role, state_key in state_keys(family, site).items():
            if state_key not in keys:
                raise LprError(
                    f"the checkpoint in {directory} stores no {role.replace('_', ' ')} of router {site} "
                    f"({state_key}) as a plain tensor",
                    "export from a checkpoint written by save_pretrained of this transformers version",
                )
            tensors[keys[state_key]] = getattr(tensors_of_site, role)
    form = drop_in_form(family)
    record = (record or {}) | {
        "source": str(source),
        "revision": revision,
        "family": family.model_type,
        "form": form,
        "router_tensors": sorted(tensors),
        "package_version": __version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    stats = write_checkpoint(directory, out, tensors, record)
    directory = str(Path(out).resolve())
    return {
        "directory": directory,
        "family": family.model_type,
        "form": form,
        "router_tensors": sorted(tensors),
    } | stats


def load_config_at(directory: Path) -> Any:
    """The transformers config of a local checkpoint directory (no custom code)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise LprError(f"cannot read the config in {directory} ({str(err).splitlines()[0]})", "check --model") from None


def run_export_checkpoint(*, cfg: RunConfig, run: RunDir, out: str | Path) -> dict[str, Any]:
    """The served routers of ``run`` (or those distilled natively beside it: ``drop_in_routers``) as a drop-in
    checkpoint at ``out``; then its manifest (last)."""
    started = time.time()
    check_states_model(cfg, run)
    config = load_config(cfg.model, resolve_model_path(cfg))  # a missing or unsupported model: one line, first
    routers, metrics, origin = drop_in_routers(run, FAMILIES[family_of(config)])
    distill = origin.read_manifest("distill")
    written = export_checkpoint(
        routers,
        resolve_model_path(cfg),
        out,
        revision=cfg.model.revision,
        record={"model": cfg.model.path, "run": origin.url, "metrics": metrics},
    )
    manifest = build_manifest(
        stage=STAGE,
        config={"model": cfg.model.model_dump(mode="json")},
        inputs={"distill": distill.fingerprint if distill else None},
        outputs={key: written[key] for key in ("directory", "family", "form", "rewritten", "linked", "copied")}
        | {"routers": len(routers), "kind": "checkpoint", "routers_from": origin.url},
        stats={key: written[key] for key in ("changed", "bytes_rewritten", "bytes_linked", "cast_max_abs_error")},
        started=started,
    )
    run.ensure()
    run.write_text(run.manifest_path(STAGE), manifest.model_dump_json(indent=2))
    info(f"[bold]export[/]: {len(routers)} routers as {written['form']} → checkpoint {written['directory']}")
    return written
