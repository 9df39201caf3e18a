"""The ``lpr-distill`` command line: one subcommand per stage, plus demo, run, status and config.

Every command takes ``--config FILE`` and ``--set KEY=VALUE`` overrides. For commands with a run
directory the base config is ``--config`` if given, else the run directory's own ``config.yaml``,
else the defaults; the resolved config is saved back as ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.runs import _names, _run_stages, _saving_config, out, print_report, print_table, resolve_config
from pipeline.config import (
    to_yaml,
)
from pipeline.errors import LprError, storage_error
from pipeline.stages.dump_shards import ShardSpec, run_dump_shard
from pipeline.stages.registry import STAGE_FUNCTIONS
from storage.rundir import RunDir

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
app.add_typer(config_app, name="config")
_state = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set dump.max_tokens=100000.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its manifest matches.")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    """Distil the router of a pretrained MoE model into a balanced Latent Prototype Router."""
    _state["debug"] = debug


@app.command()
def dump(
    run_dir: Annotated[str, typer.Argument(help="Run directory (path or fsspec URL).")],
    model: Annotated[str | None, typer.Option(help="Checkpoint directory, hub id, or 'demo'.")] = None,
    corpus: Annotated[
        str | None, typer.Option(help="Text file/folder, JSONL, Parquet, dataset dir, hf:NAME, or 'demo'.")
    ] = None,
    text_field: Annotated[
        str | None, typer.Option(help="Field/column with the text (JSONL, Parquet, datasets).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the model.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Token budget over the train split.")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Tokens per forward pass.")] = None,
    trust_remote_code: Annotated[
        bool | None, typer.Option("--trust-remote-code", help="Run the checkpoint's own code.")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="I/N: dump only shard I of N (batches ≡ I mod N) into its own store; concurrent workers."),
    ] = None,
    shards: Annotated[int | None, typer.Option(help="dump.shards: merge this many complete shards.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Record router inputs and decisions of every MoE layer into RUN_DIR/states.zarr.

    Sharded: `dump RUN --shard I/N` workers (at once, on any machines sharing RUN), then `dump RUN` merges."""
    spec = ShardSpec.parse(shard) if shard is not None else None  # a bad spec fails before anything else
    run = RunDir(run_dir)
    flags = {
        "model.path": model,
        "model.revision": revision,
        "model.trust_remote_code": trust_remote_code,
        "corpus.source": corpus,
        "corpus.text_field": text_field,
        "dump.max_tokens": max_tokens,
        "dump.batch_tokens": batch_tokens,
        "dump.shards": spec.count if spec is not None else shards,
    }
    cfg = resolve_config(run=run, config=config, sets=set_, flags=flags)
    if spec is None:
        _run_stages(["dump"], run=run, cfg=cfg, force=force)
        return
    with _saving_config(run, cfg):
        result = run_dump_shard(cfg=cfg, run=run, shard=spec, force=force)
    if not result["skipped"]:
        resumed = f", resumed at row {result['resumed_from_row']:,}" if result.get("resumed_from_row") else ""
        out.print(f"[green]✓[/] dump shard {spec} complete: {result['rows']:,} rows{resumed}; then `dump` merges")


@app.command()
def cluster(
    run_dir: Annotated[str, typer.Argument(help="Run directory with a complete dump.")],
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers to redo (the rest is reused), e.g. 0,2 or layer_003.")
    ] = None,
    latent_dim: Annotated[int | None, typer.Option(help="PCA components per layer.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Latent basis + exactly balanced k-means per MoE layer → RUN_DIR/prototypes."""
    from pipeline.stages.cluster import run_cluster

    run = RunDir(run_dir)
    cfg = resolve_config(run=run, config=config, sets=set_, flags={"cluster.latent_dim": latent_dim})
    names = [name for name in layers.split(",") if name.strip()] if layers else None
    with _saving_config(run, cfg):
        manifest = run_cluster(cfg=cfg, run=run, force=force, layers=names)
    if not manifest.skipped:
        out.print(f"[green]✓[/] cluster finished in {manifest.seconds:.1f} s")
    table = Table(title="prototypes per layer")
    columns = ("layer", "rows", "latent", "variance kept", "slots min–max", "MSE", "matched share", "chance", "s")
    for column in columns:
        table.add_column(column, justify="right")
    for layer, row in manifest.stats["layers"].items():
        table.add_row(
            layer,
            f"{row['rows']:,}",
            str(row["latent_dim"]),
            f"{row['variance_kept']:.1%}",
            f"{row['size_min']:,}–{row['size_max']:,}",
            f"{row['mse']:.4g}",
            f"{row['matched_share']:.1%}",
            f"{row['chance_share']:.1%}",
            f"{row['seconds']:.1f}",
        )
    print_table(table)


@app.command()
def distill(
    run_dir: Annotated[str, typer.Argument(help="Run directory with complete prototypes.")],
    balance: Annotated[float | None, typer.Option(help="0: imitate the teacher … 1: its balanced projection.")] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Gate-level optimiser steps per layer (model level: --set distill.model_steps=N)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Distil one LPR router per MoE layer (gate level, then in the model), calibrate its bias → RUN_DIR/routers.

    --set router.init=gate starts from the model's own gates instead of the clusters (in the model only).
    """
    run = RunDir(run_dir)
    cfg = resolve_config(run=run, config=config, sets=set_, flags={"distill.balance": balance, "distill.steps": steps})
    _run_stages(["distill"], run=run, cfg=cfg, force=force)


@app.command()
def validate(
    run_dir: Annotated[str, typer.Argument(help="Run directory with dump, cluster and distill done.")],
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variants (default: original,original+bias,lpr-init,lpr).")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated lm-eval tasks ('' for none; default: lpr_demo_cloze).")
    ] = None,
    sequences: Annotated[int | None, typer.Option(help="Held-out sequences for loss and load.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Every routing variant in the model, on held-out text and lm-eval tasks → RUN_DIR/report."""
    run = RunDir(run_dir)
    flags = {
        "validate.variants": _names(variants),
        "validate.tasks": _names(tasks),
        "validate.sequences": sequences,
    }
    cfg = resolve_config(run=run, config=config, sets=set_, flags=flags)
    _run_stages(["validate"], run=run, cfg=cfg, force=force)
    print_report(run)


@app.command()
def sweep(
    run_dir: Annotated[str, typer.Argument(help="Run directory with dump and cluster done.")],
    balance: Annotated[
        str | None, typer.Option(help="Comma-separated distill.balance settings (default: validate.sweep_balance).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Distil at each balance setting (RUN_DIR/sweep/balance_B) and plot held-out loss against Gini."""
    from pipeline.stages.sweep import run_sweep

    run = RunDir(run_dir)
    cfg = resolve_config(run=run, config=config, sets=set_)
    try:
        balances = [float(b) for b in _names(balance)] if balance is not None else cfg.validate.sweep_balance
    except ValueError:
        raise LprError(
            f"--balance {balance!r} is not a comma-separated list of numbers", "e.g. --balance 0,0.5,1"
        ) from None
    results = run_sweep(cfg=cfg, run=run, balances=balances, force=force)
    table = Table(title="quality/balance frontier (held-out, means over layers)")
    for column in ("curve", "setting", "Gini", "min/max", "CE", "agreement"):
        table.add_column(column, justify="right")
    rows = [("lpr (balance)", p) for p in results["lpr"]] + [("bias (strength)", p) for p in results["bias"]]
    rows += [(name, p | {"label": ""}) for name, p in results["points"].items()]
    for curve, p in rows:
        cells = [f"{p['gini']:.3f}", f"{p['min_max']:.2f}", f"{p['cross_entropy']:.4f}", f"{p['topk_agreement']:.1%}"]
        table.add_row(curve, p["label"], *cells)
    print_table(table)
    out.print(f"frontier: {run.url_of(run.path('sweep'))}/frontier.png", highlight=False)


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="Run directory.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Output directory (default: RUN_DIR/lpr, or RUN_DIR/lpr_init).")
    ] = None,
    init_only: Annotated[
        bool, typer.Option("--init-only", help="Export LPR-init routers (clusters + calibration, no distillation).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write router weights + config + card that `load_lpr_model` puts into the model."""
    from pipeline.stages.export import run_export, run_export_init

    run = RunDir(run_dir)
    cfg = resolve_config(run=run, config=config, sets=set_)
    if out_dir is None and not run.is_local:
        raise LprError("export writes to a local directory", "pass --out with a local path")
    if init_only:
        path = run_export_init(cfg=cfg, run=run, out=out_dir or run.path("lpr_init"))
    else:
        path = run_export(cfg=cfg, run=run, out=out_dir or run.path("lpr"))
    out.print(f"load with: from pipeline import load_lpr_model; load_lpr_model(MODEL, '{path}')", highlight=False)


@app.command("run")
def run_all(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    run_dir: Annotated[str | None, typer.Option(help="Run directory (default: runs/<config name>).")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run every stage in order into the run directory."""
    run = RunDir(run_dir or f"runs/{config.stem}")
    cfg = resolve_config(run=run, config=config, sets=set_)
    _run_stages(list(STAGE_FUNCTIONS), run=run, cfg=cfg, force=force)
    out.print(f"run directory: {run.url}")


ScheduleOpts = {
    "cron": typer.Option(help='Cron schedule, e.g. "0 3 * * *" (nightly at 03:00 UTC).'),
    "interval": typer.Option(help="Or: run every this many seconds."),
    "name": typer.Option(help="Deployment name (the flow is lpr-distill)."),
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
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Create or update a scheduled deployment of the lpr-distill flow on the server at PREFECT_API_URL."""
    from flows.deploy import deploy as deploy_flow

    run = RunDir(run_dir or f"runs/{config.stem}")
    cfg = resolve_config(run=None, config=config, sets=set_)
    deployment = deploy_flow(cfg, run.url, name=name, pool=pool, cron=cron, interval=interval, force=force)
    out.print(f"deployment lpr-distill/{name} ({deployment}) in work pool '{pool}'", highlight=False)


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config: the deployment's parameters.")],
    run_dir: Annotated[str | None, typer.Option(help="Run directory (default: runs/<config name>).")] = None,
    cron: Annotated[str | None, ScheduleOpts["cron"]] = None,
    interval: Annotated[float | None, ScheduleOpts["interval"]] = None,
    name: Annotated[str, ScheduleOpts["name"]] = "lpr-distill",
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Create or update the deployment and run its scheduled and triggered runs here until stopped."""
    from flows.deploy import serve as serve_flow

    run = RunDir(run_dir or f"runs/{config.stem}")
    cfg = resolve_config(run=None, config=config, sets=set_)
    serve_flow(cfg, run.url, name=name, cron=cron, interval=interval, force=force)


@app.command()
def demo(
    run_dir: Annotated[str, typer.Option(help="Run directory.")] = "runs/demo",
    collapsed: Annotated[
        bool, typer.Option("--collapsed", help="Use the demo model trained with no balancing loss.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Build the demo model and corpus (cached), then run every stage that exists into RUN_DIR."""
    run = RunDir(run_dir)
    flags = {"model.path": "demo", "corpus.source": "demo", "demo.variant": "collapsed" if collapsed else None}
    cfg = resolve_config(run=run, config=config, sets=set_, flags=flags)
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


@config_app.command("show")
def config_show(
    run_dir: Annotated[str | None, typer.Argument(help="Run directory whose config.yaml is the base.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved configuration as YAML."""
    run = RunDir(run_dir) if run_dir else None
    print(to_yaml(resolve_config(run=run, config=config, sets=set_)), end="")


def run() -> None:
    """Console-script entry point: one line and a non-zero exit for every user error."""
    try:
        app(standalone_mode=False)
    except LprError as err:
        if _state["debug"]:
            raise
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/] — rerun the same command to resume")
        sys.exit(130)
    except Exception as err:
        import click

        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if _state["debug"]:
            raise
        if (mapped := storage_error(err)) is not None:  # a full disk or an unwritable path, however wrapped
            Console(stderr=True).print(f"[red]error:[/] {mapped}", highlight=False, soft_wrap=True)
            sys.exit(2)
        first = str(err).splitlines()[0] if str(err) else ""
        Console(stderr=True).print(
            f"[red]error:[/] {type(err).__name__}: {first}. Rerun with --debug for the traceback.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    run()
