"""The ``lpr_distill`` flow: every registered stage in order, per-layer stages fanned out by layer.

Stages come from ``pipeline.stages.registry.STAGE_FUNCTIONS`` (the CLI's list, so a stage added
there is in the flow). A per-layer stage (``flows/layer_stages.py``) runs as plan → one task per
layer on the configured task runner (threads or Dask) → commit by its own ``run_<stage>``; a
sharded dump (``dump.shards`` > 1) runs as one task per shard on that runner → the merge; every
other stage is one task. Skip and force follow the manifests: a rerun with nothing new skips every
stage and creates no layer or shard tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from prefect import flow, unmapped
from prefect.futures import wait
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner

from flows import tasks
from flows.artifacts import publish
from flows.layer_stages import LAYER_STAGES
from flows.runners import task_runner
from pipeline.config import RunConfig, build_config
from pipeline.stages.registry import STAGE_FUNCTIONS


@flow(name="lpr-distill", flow_run_name="lpr-distill {run_dir}", log_prints=True)
def lpr_distill(
    config: dict[str, Any],
    run_dir: str,
    force: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every stage into ``run_dir`` (a path or an fsspec URL) with the run config ``config``
    (the sections of a run.yaml). Returns per stage: skipped or not, seconds, stats."""
    cfg = build_config(config, origin="flow parameter 'config'")
    retry = {"retries": cfg.flow.retries, "retry_delay_seconds": cfg.flow.retry_delay_seconds}
    common = {"cfg": cfg, "run_dir": run_dir, "storage_options": storage_options}
    tasks.prepare_task.with_options(**retry)(**common)
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        runners: list[TaskRunner] = []

        def runner() -> TaskRunner:  # started only when a layer has work: a skipped rerun starts no cluster
            if not runners:
                runners.append(stack.enter_context(task_runner(cfg.flow)))
            return runners[0]

        for stage in STAGE_FUNCTIONS:
            if stage in LAYER_STAGES:
                results[stage] = _layer_stage(stage, runner, retry=retry, force=force, common=common)
            elif stage == "dump" and cfg.dump.shards > 1:
                results[stage] = _sharded_dump(runner, retry=retry, force=force, common=common)
            else:
                results[stage] = tasks.stage_task.with_options(**retry)(stage=stage, force=force, **common)
    publish(tasks.open_run(run_dir, storage_options), results)
    ran = [stage for stage, result in results.items() if not result["skipped"]]
    get_run_logger().info(f"stages run: {', '.join(ran)}" if ran else "nothing new: every stage skipped")
    return results


def _layer_stage(
    stage: str, runner: Callable[[], TaskRunner], *, retry: dict, force: bool, common: dict[str, Any]
) -> dict[str, Any]:
    """plan → one task per layer on the runner → commit; a stage whose manifest matches stops at its plan."""
    started = time.time()
    plan = tasks.plan_task.with_options(**retry)(stage=stage, force=force, **common)
    if plan["skip"]:
        return _skipped(stage, common)
    per_layer = {"layer": plan["layers"]} | {
        key: unmapped(value) for key, value in (common | {"fingerprint": plan["fingerprint"], "force": force}).items()
    }
    futures = runner().map(tasks.layer_task.with_options(**retry), {"stage": unmapped(stage), **per_layer})
    wait(futures)  # every layer finishes (or fails) before anything raises: finished layers are kept
    layer_results = [future.result() for future in futures]
    result = tasks.commit_task.with_options(**retry)(stage=stage, started=started, **common)
    return result | {"layer_results": layer_results}


def _sharded_dump(
    runner: Callable[[], TaskRunner], *, retry: dict, force: bool, common: dict[str, Any]
) -> dict[str, Any]:
    """``dump.shards`` shard tasks on the runner, then the merge (the dump's own ``run_dump``)."""
    if not force and tasks.dump_current_task.with_options(**retry)(**common):
        return _skipped("dump", common)
    shards = list(range(common["cfg"].dump.shards))
    parameters = {"index": shards} | {key: unmapped(value) for key, value in (common | {"force": force}).items()}
    futures = runner().map(tasks.dump_shard_task.with_options(**retry), parameters)
    wait(futures)  # every shard finishes (or fails) first: a finished shard is kept for the rerun
    shard_results = [future.result() for future in futures]
    result = tasks.stage_task.with_options(**retry)(stage="dump", force=False, **common)  # the shards were forced
    return result | {"shard_results": shard_results}


def _skipped(stage: str, common: dict[str, Any]) -> dict[str, Any]:
    """A stage whose manifest matches, reported with that manifest's figures."""
    return {"stage": stage, "skipped": True, "finished_at": "", "seconds": 0.0, "stats": {}} | _manifest_outcome(
        stage, common
    )


def _manifest_outcome(stage: str, common: dict[str, Any]) -> dict[str, Any]:
    """A skipped per-layer stage reports its existing manifest's figures (for the artifacts)."""
    run = tasks.open_run(common["run_dir"], common["storage_options"])
    manifest = run.read_manifest(stage)
    return {} if manifest is None else {"finished_at": manifest.finished_at, "stats": manifest.stats}


def run_flow(
    cfg: RunConfig, run_dir: str, *, force: bool = False, storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the flow in this process (what tests and scripts call; deployments run ``lpr_distill``)."""
    return lpr_distill(cfg.model_dump(mode="json"), run_dir, force=force, storage_options=storage_options)
