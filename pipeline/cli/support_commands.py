"""The commands around the stages: demo, status, config show, and Prefect deploy/serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.app import ConfigOpt, ForceOpt, SetOpt, app, config_app
from pipeline.cli.runs import _run_stages, out, print_report, print_table, resolve_config
from pipeline.config import ValidateConfig, to_yaml
from pipeline.stages.registry import STAGE_FUNCTIONS
from storage.rundir import RunDir

ScheduleOpts = {
    "cron": typer.Option(help='Cron schedule, e.g. "0 3 * * *" (nightly at 03:00 UTC).'),
    "interval": typer.Option(help="Or: run every this many seconds."),
    "name": typer.Option(help="Deployment name (the flow is lpr-distill, or lpr-recalibrate with --recalibrate-from)."),
    "traffic": typer.Option(
        "--recalibrate-from",
        help="Deploy the recalibration instead: each run recalibrates on the files new in this folder or bucket.",
    ),
}


@app.command()
def deploy(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config: the deployment's parameters.")],
    run_dir: Annotated[str | None, typer.Option(help="Run directory (default: runs/<config name>).")] = None,
    cron: Annotated[str | None, ScheduleOpts["cron"]] = None,
    interval: Annotated[float | None, ScheduleOpts["interval"]] = None,
    name: Annotated[str, ScheduleOpts["name"]] = "lpr-distill",
    pool: Annotated[str, typer.Option(help="Process work pool (created if missing) whose worker runs it.")] = (
        "lpr-distill"
    ),
    traffic: Annotated[str | None, ScheduleOpts["traffic"]] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Create or update a scheduled deployment of the lpr-distill flow on the server at PREFECT_API_URL."""
    from flows.deploy import deploy as deploy_flow

    run = RunDir(run_dir or f"runs/{config.stem}")
    cfg = resolve_config(run=None, config=config, sets=set_)
    deployment = deploy_flow(
        cfg, run.url, name=name, pool=pool, cron=cron, interval=interval, force=force, traffic=traffic
    )
    flow = "lpr-recalibrate" if traffic else "lpr-distill"
    out.print(f"deployment {flow}/{name} ({deployment}) in work pool '{pool}'", highlight=False)


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config: the deployment's parameters.")],
    run_dir: Annotated[str | None, typer.Option(help="Run directory (default: runs/<config name>).")] = None,
    cron: Annotated[str | None, ScheduleOpts["cron"]] = None,
    interval: Annotated[float | None, ScheduleOpts["interval"]] = None,
    name: Annotated[str, ScheduleOpts["name"]] = "lpr-distill",
    traffic: Annotated[str | None, ScheduleOpts["traffic"]] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Create or update the deployment and run its scheduled and triggered runs here until stopped."""
    from flows.deploy import serve as serve_flow

    run = RunDir(run_dir or f"runs/{config.stem}")
    cfg = resolve_config(run=None, config=config, sets=set_)
    serve_flow(cfg, run.url, name=name, cron=cron, interval=interval, force=force, traffic=traffic)


@app.command()
def demo(
    run_dir: Annotated[
        str | None, typer.Option(help="Run directory (default: runs/demo, or runs/demo-FAMILY for another family).")
    ] = None,
    collapsed: Annotated[
        bool, typer.Option("--collapsed", help="Use the demo model trained with no balancing loss.")
    ] = False,
    family: Annotated[
        str | None,
        typer.Option(help="Demo model family: qwen3_moe (default; no bias tensor) or deepseek_v3 (choice bias)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Build the demo model and corpus (cached), then run every stage into RUN_DIR, with the native routers beside."""
    run = RunDir(run_dir or ("runs/demo" if family in (None, "qwen3_moe") else f"runs/demo-{family}"))
    flags = {
        "model.path": "demo",
        "corpus.source": "demo",
        "demo.variant": "collapsed" if collapsed else None,
        "demo.family": family,
    }
    presets = {"validate.variants": [*ValidateConfig().variants, "native"]}  # the drop-in routers beside the LPR
    cfg = resolve_config(run=run, config=config, sets=set_, flags=flags, presets=presets)
    _run_stages(list(STAGE_FUNCTIONS), run=run, cfg=cfg, force=force)
    print_report(run)
    out.print(f"run directory: {run.url} — see `lpr-distill status {run.url}`")


@app.command()
def status(
    run_dir: Annotated[str, typer.Argument(help="Run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Which stages are complete, rows per layer, sizes."""
    from pipeline.cli.status import run_status

    report = run_status(RunDir(run_dir))
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"lpr-distill run {run_dir}")
    for column in ("stage", "state", "finished (UTC)", "seconds", "size", "details"):
        table.add_column(column)
    for stage, info in report["stages"].items():
        state = "[green]complete[/]" if info["complete"] else ("[yellow]partial[/]" if info.get("partial") else "—")
        size = f"{info['bytes'] / 2**20:,.1f} MiB" if info.get("bytes") else ""
        finished = info.get("finished_at", "").replace("T", " ").removesuffix("+00:00")  # UTC
        seconds = f"{info['seconds']:.1f}" if "seconds" in info else ""
        table.add_row(stage, state, finished, seconds, size, info.get("details", ""))
    print_table(table)
    if len(report["versions"]) > 1:
        versions = Table(title="routers versions")
        for column in ("version", "made by", "served", "held-out traffic Gini", "created (UTC)"):
            versions.add_column(column)
        for row in report["versions"]:
            served = "[green]served[/]" if row["current"] else ("stale" if row["stale"] else "")
            gini = f"{row['gini_before']:.3f} → {row['gini_after']:.3f}" if "gini_before" in row else ""
            created = row.get("created_at", "").replace("T", " ").removesuffix("Z")
            versions.add_row(str(row["version"]), row["made_by"], served, gini, created)
        print_table(versions)


@config_app.command("show")
def config_show(
    run_dir: Annotated[str | None, typer.Argument(help="Run directory whose config.yaml is the base.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved configuration as YAML."""
    run = RunDir(run_dir) if run_dir else None
    print(to_yaml(resolve_config(run=run, config=config, sets=set_)), end="")
