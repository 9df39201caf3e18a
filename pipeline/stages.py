"""The protocol every stage follows: skip when its manifest matches, else redo and commit last."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pipeline import __version__
from pipeline.progress import info
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
