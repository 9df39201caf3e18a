"""The stages that exist, in pipeline order: the CLI and the flows call these and nothing else."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.stages.cluster import run_cluster
from pipeline.stages.distill import run_distill
from pipeline.stages.dump import run_dump
from pipeline.stages.validate import run_validate
from storage.rundir import Manifest

StageFunction = Callable[..., Manifest]  # run_<stage>(*, cfg: RunConfig, run: RunDir, force: bool) -> Manifest

STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "dump": run_dump,
    "cluster": run_cluster,
    "distill": run_distill,
    "validate": run_validate,
}
