"""The ``lpr_recalibrate`` flow: on a schedule, recalibrate the served routers on the traffic samples
that arrived since the last run, and publish the new version only when it is better on that traffic.

Each run lists the traffic folder (local or a bucket), takes the files no earlier run took (a new
name, or a changed size or time), and runs ``lpr-distill recalibrate`` on exactly those: their
training side calibrates the choice bias, their held-out side judges the new version against the
served one. Nothing new: the run skips. The files are marked as taken once their version is written,
published or not; a run that fails leaves them for the next.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pipeline.config import CorpusConfig, RunConfig, build_config
from pipeline.stages.recalibrate import run_recalibrate
from storage.rundir import RunDir
from storage.versions import mark_traffic_seen, new_traffic


@task(name="new-traffic", cache_policy=NO_CACHE)
def new_traffic_task(run_dir: str, traffic: str, storage_options: dict[str, Any] | None) -> dict[str, list]:
    return new_traffic(RunDir(run_dir, storage_options), traffic, storage_options)


@task(name="recalibrate", cache_policy=NO_CACHE)
def recalibrate_task(
    cfg: RunConfig, run_dir: str, traffic: str, files: list[str], storage_options: dict[str, Any] | None
) -> dict[str, Any]:
    """``run_recalibrate`` on the given files of the traffic folder; returns the manifest's stats."""
    corpus = CorpusConfig.model_validate(
        cfg.corpus.model_dump() | {"source": traffic, "format": "text", "include": files, "suffixes": None}
    )
    return run_recalibrate(cfg=cfg, run=RunDir(run_dir, storage_options), traffic=corpus).stats


def before_after_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per MoE layer (and the mean): held-out traffic Gini and min/max before and after."""
    before, after = stats["before"], stats["after"]
    rows = [
        {
            "layer": layer,
            "gini_before": row["gini"],
            "gini_after": after["layers"][layer]["gini"],
            "min_max_before": row["min_max"],
            "min_max_after": after["layers"][layer]["min_max"],
        }
        for layer, row in before["layers"].items()
    ]
    mean = {"layer": "mean", "gini_before": before["gini"], "gini_after": after["gini"]}
    return [*rows, mean | {"min_max_before": before["min_max"], "min_max_after": after["min_max"]}]


def recalibration_markdown(run_dir: str, traffic: str, files: list[str], stats: dict[str, Any]) -> str:
    before, after = stats["before"], stats["after"]
    cost = (after["cross_entropy"] / before["cross_entropy"] - 1) * 100
    verdict = "**published**" if stats["published"] else "kept, **not published**"
    lines = [
        f"# lpr-recalibrate — `{run_dir}`",
        "",
        f"{len(files)} new traffic files in `{traffic}`; routers version {stats['parent']} → {stats['version']}: "
        f"{verdict} ({stats['judgement']}).",
        "",
        f"Held-out traffic: {before['documents']} documents, Gini floor {before['floor']:.3f}; cross-entropy "
        f"{before['cross_entropy']:.4f} → {after['cross_entropy']:.4f} ({cost:+.2f} %).",
        "",
        "| layer | Gini before | Gini after | min/max before | min/max after |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['gini_before']:.3f} | {r['gini_after']:.3f} | {r['min_max_before']:.2f} | "
        f"{r['min_max_after']:.2f} |"
        for r in before_after_rows(stats)
    ]
    return "\n".join(lines) + "\n"


@flow(name="lpr-recalibrate", flow_run_name="lpr-recalibrate {run_dir}", log_prints=True)
def lpr_recalibrate(
    config: dict[str, Any], run_dir: str, traffic: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Recalibrate the routers in ``run_dir`` on the files of ``traffic`` that are new since the last run."""
    cfg = build_config(config, origin="flow parameter 'config'")
    logger = get_run_logger()
    new = new_traffic_task(run_dir, traffic, storage_options)
    if not new:
        logger.info(f"no new traffic in {traffic}: nothing to recalibrate")
        return {"skipped": True, "files": []}
    files = sorted(new)
    logger.info(f"{len(files)} new traffic files in {traffic}")
    stats = recalibrate_task(cfg, run_dir, traffic, files, storage_options)
    mark_traffic_seen(RunDir(run_dir, storage_options), new)
    create_markdown_artifact(
        recalibration_markdown(run_dir, traffic, files, stats), key="lpr-recalibrate", description=run_dir
    )
    create_table_artifact(before_after_rows(stats), key="lpr-recalibrate-layers", description="held-out traffic")
    return {"skipped": False, "files": files, **stats}


def run_recalibrate_flow(
    cfg: RunConfig, run_dir: str, traffic: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the flow in this process (what tests and scripts call; deployments run ``lpr_recalibrate``)."""
    return lpr_recalibrate(cfg.model_dump(mode="json"), run_dir, traffic, storage_options=storage_options)
