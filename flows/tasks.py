"""Prefect tasks: thin wrappers that open the run directory and call one ``pipeline`` function.

Every task touches storage (the run directory, the states store), so each retries
``flow.retries`` times on errors that can pass (I/O, network); an ``LprError`` is a problem with
the inputs or the config and fails at once. Task parameters are plain data (the config, the run
directory URL), so the tasks run the same in threads and on Dask workers.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.layer_stages import LAYER_STAGES, plan_stage
from pipeline.config import RunConfig, to_yaml
from pipeline.errors import LprError
from pipeline.stages.dump_shards import ShardSpec, dump_up_to_date, run_dump_shard
from pipeline.stages.registry import STAGE_FUNCTIONS
from storage.rundir import Manifest, RunDir


def open_run(run_dir: str, storage_options: dict[str, Any] | None) -> RunDir:
    return RunDir(run_dir, storage_options)


def _retry_storage_errors(task: Task, task_run: Any, state: Any) -> bool:
    """Retry unless the task failed with an LprError (a config or input problem no retry fixes)."""
    try:
        state.result()
    except LprError:
        return False
    except Exception:
        return True
    return False


def outcome(stage: str, manifest: Manifest) -> dict[str, Any]:
    """What the flow reports about a stage: ran or skipped, when, how long, its stats."""
    return {
        "stage": stage,
        "skipped": manifest.skipped,
        "finished_at": manifest.finished_at,
        "seconds": manifest.seconds,
        "stats": manifest.stats,
    }


_options: dict[str, Any] = dict(cache_policy=NO_CACHE, retry_condition_fn=_retry_storage_errors)


@task(name="prepare", task_run_name="prepare {run_dir}", **_options)
def prepare_task(cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None) -> None:
    """Create the run directory and save the resolved config (as the CLI does)."""
    run = open_run(run_dir, storage_options)
    run.ensure()
    run.write_config(to_yaml(cfg))


@task(name="stage", task_run_name="{stage}", **_options)
def stage_task(
    stage: str, cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None, force: bool
) -> dict[str, Any]:
    """A whole stage (dump, validate, …): the function the CLI calls; skipped when its manifest matches."""
    manifest = STAGE_FUNCTIONS[stage](cfg=cfg, run=open_run(run_dir, storage_options), force=force)
    _say(stage, manifest)
    return outcome(stage, manifest)


@task(name="dump-current", task_run_name="dump-current", **_options)
def dump_current_task(cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether the dump's manifest matches (a sharded dump then submits no shard task)."""
    return dump_up_to_date(cfg=cfg, run=open_run(run_dir, storage_options))


@task(name="dump-shard", task_run_name="dump-shard-{index}", **_options)
def dump_shard_task(
    index: int, cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None, force: bool
) -> dict[str, Any]:
    """One worker of a sharded dump (what `lpr-distill dump RUN --shard I/N` runs): its slice, its own store."""
    shard = ShardSpec(index, cfg.dump.shards)
    result = run_dump_shard(cfg=cfg, run=open_run(run_dir, storage_options), shard=shard, force=force)
    get_run_logger().info(f"dump shard {shard}: {result['rows']:,} rows")
    return result


@task(name="plan", task_run_name="{stage}-plan", **_options)
def plan_task(
    stage: str, cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None, force: bool
) -> dict[str, Any]:
    """Skip a per-layer stage whose manifest matches, else name the layers to fan out and their fingerprint."""
    plan = plan_stage(stage, cfg, open_run(run_dir, storage_options), force=force)
    if plan.skip:
        get_run_logger().info(f"{stage}: up to date (manifest matches) — skipped, no layer work")
    return {"skip": plan.skip, "fingerprint": plan.fingerprint, "layers": list(plan.layers)}


@task(name="layer", task_run_name="{stage}-{layer}", **_options)
def layer_task(
    stage: str,
    layer: str,
    fingerprint: str,
    cfg: RunConfig,
    run_dir: str,
    storage_options: dict[str, Any] | None,
    force: bool,
) -> dict[str, Any]:
    """One layer of a per-layer stage, into the stage's partial output (reused when already done)."""
    result = LAYER_STAGES[stage].run_layer(cfg, open_run(run_dir, storage_options), layer, fingerprint, force)
    what = "reused (already done with this config)" if result["reused"] else "done"
    get_run_logger().info(f"{stage} {layer}: {what}")
    return result


@task(name="commit", task_run_name="{stage}-commit", **_options)
def commit_task(
    stage: str, cfg: RunConfig, run_dir: str, storage_options: dict[str, Any] | None, started: float
) -> dict[str, Any]:
    """The stage's own ``run_<stage>``: reuses every layer the fan-out wrote, writes the manifest last.

    Its manifest times only this call; it is rewritten (atomically, still last) with ``started`` —
    when the stage's plan began — so `lpr-distill status` shows the stage's wall time, fan-out included.
    """
    run = open_run(run_dir, storage_options)
    manifest = STAGE_FUNCTIONS[stage](cfg=cfg, run=run, force=False)
    if not manifest.skipped:
        manifest = manifest.model_copy(
            update={
                "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started, 3),
            }
        )
        run.write_text(run.manifest_path(stage), manifest.model_dump_json(indent=2))
    _say(stage, manifest)
    return outcome(stage, manifest)


def _say(stage: str, manifest: Manifest) -> None:
    if manifest.skipped:
        get_run_logger().info(f"{stage}: up to date (manifest matches, finished {manifest.finished_at}) — skipped")
    else:
        get_run_logger().info(f"{stage}: finished in {manifest.seconds:.1f} s")
