"""The protocol every stage follows: skip when its manifest matches, else redo and commit last."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.progress import info
from pipeline.version import __version__
from storage.rundir import Manifest, RunDir, fingerprint


def previous_run(run: RunDir, stage: str, fp: str, *, force: bool) -> Manifest | None:
    """The matching manifest of a complete earlier run (the stage can be skipped), or None.

    When the stage must run, the manifests of it and of every later stage are removed first,
    so nothing downstream looks complete while its inputs are being redone.
    """
    if not force:
        manifest = run.matching_manifest(stage, fp)
        if manifest is not None:
            info(
                f"[bold]{stage}[/]: up to date (manifest matches, finished {manifest.finished_at}); "
                "skipped — --force redoes it"
            )
            return manifest
    run.invalidate(stage)
    return None


def build_manifest(
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    stats: dict[str, Any],
    started: float,
) -> Manifest:
    return Manifest(
        stage=stage,
        fingerprint=fingerprint(config, inputs),
        config=config,
        inputs=inputs,
        package_version=__version__,
        outputs=outputs,
        stats=stats,
        started_at=datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.time() - started, 3),
    )


def check_states_model(cfg: RunConfig, run: RunDir) -> None:
    """Refuse a states store dumped from another model or revision than the one ``cfg`` names.

    Local checkpoints compare by content hash (a moved directory still matches); hub ids and the
    demo by name. Cheap: a config and the ends of each weight file, no weights loaded.
    """
    from pipeline.moe.loading import model_identity

    dump = run.read_manifest("dump")
    if dump is None:
        return  # the caller reports the missing dump
    stored = dump.inputs.get("model", {})
    dumped_path, dumped_revision = dump.config["model"]["path"], dump.config["model"]["revision"]
    if cfg.model.path == "demo" or dumped_path == "demo":
        same = cfg.model.path == dumped_path
    else:
        current = model_identity(cfg.model.path, cfg.model.revision)
        same = current.get("hash", current["model"]) == stored.get("hash", stored.get("model"))
    if not same or cfg.model.revision != dumped_revision:
        raise LprError(
            f"the states store in {run.url} was dumped from model {dumped_path} (revision {dumped_revision}), "
            f"but the config names {cfg.model.path} (revision {cfg.model.revision})",
            f"pass the model the run was dumped with (--set model.path={dumped_path}), or dump again with --force",
        )
