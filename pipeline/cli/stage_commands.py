"""The stage commands: dump, cluster, distill, validate, sweep, export, and run (all of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.app import ConfigOpt, ForceOpt, SetOpt, app
from pipeline.cli.runs import _names, _run_stages, _saving_config, out, print_report, print_table, resolve_config
from pipeline.errors import LprError
from pipeline.stages.dump_shards import ShardSpec, run_dump_shard
from pipeline.stages.registry import STAGE_FUNCTIONS
from storage.rundir import RunDir


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
    checkpoint: Annotated[
        str | None, typer.Option(help="Also measure this `export --checkpoint` directory (variant 'checkpoint').")
    ] = None,
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
        "validate.checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
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
    checkpoint: Annotated[
        str | None,
        typer.Option(help="Write a complete checkpoint of the model with the routers in its own router tensors."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write router weights + config + card that `load_lpr_model` puts into the model.

    --checkpoint OUT: a drop-in checkpoint instead (stock from_pretrained, serving engines)."""
    from pipeline.stages.export import run_export, run_export_init

    run = RunDir(run_dir)
    cfg = resolve_config(run=run, config=config, sets=set_)
    if checkpoint is not None:
        if init_only or out_dir is not None:
            raise LprError("--checkpoint writes the distilled routers into a checkpoint", "drop --init-only and --out")
        from pipeline.stages.export_checkpoint import run_export_checkpoint

        written = run_export_checkpoint(cfg=cfg, run=run, out=checkpoint)
        out.print(f"checkpoint ({written['form']}): {written['directory']}", highlight=False)
        out.print(f"load with: AutoModelForCausalLM.from_pretrained('{written['directory']}')", highlight=False)
        return
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


@app.command()
def recalibrate(
    run_dir: Annotated[str, typer.Argument(help="Run directory with distilled routers.")],
    corpus: Annotated[
        str,
        typer.Option(help="Traffic sample: file, folder, URL, dataset, hf:NAME (split by document like any corpus)."),
    ],
    text_field: Annotated[
        str | None, typer.Option(help="Field/column with the text (JSONL, Parquet, datasets).")
    ] = None,
    sequences: Annotated[int | None, typer.Option(help="Training-side traffic sequences to calibrate on.")] = None,
    publish: Annotated[str | None, typer.Option(help="better (default) | always | never.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Recompute the routers' choice bias on your traffic as a new version; publish it when it is better there."""
    from pipeline.config import CorpusConfig
    from pipeline.stages.recalibrate import run_recalibrate

    run = RunDir(run_dir)
    flags = {"recalibrate.sequences": sequences, "recalibrate.publish": publish}
    cfg = resolve_config(run=run, config=config, sets=set_, flags=flags)
    fields = {"source": corpus, "format": "auto", "include": None, "text_field": text_field or cfg.corpus.text_field}
    traffic = CorpusConfig.model_validate(cfg.corpus.model_dump() | fields)
    with _saving_config(run, cfg):
        manifest = run_recalibrate(cfg=cfg, run=run, traffic=traffic)
    stats = manifest.stats
    before, after = stats["before"], stats["after"]
    table = Table(title=f"recalibrate: version {stats['parent']} → {stats['version']} on {corpus} (held-out traffic)")
    for column in ("layer", "Gini before", "Gini after", "min/max before", "min/max after"):
        table.add_column(column)
    for layer, row in before["layers"].items():
        new = after["layers"][layer]
        table.add_row(
            layer, f"{row['gini']:.3f}", f"{new['gini']:.3f}", f"{row['min_max']:.2f}", f"{new['min_max']:.2f}"
        )
    table.add_row(
        "mean", f"{before['gini']:.3f}", f"{after['gini']:.3f}", f"{before['min_max']:.2f}", f"{after['min_max']:.2f}"
    )
    print_table(table)
    cost = (after["cross_entropy"] / before["cross_entropy"] - 1) * 100
    out.print(
        f"held-out traffic: {before['documents']} documents, Gini floor {before['floor']:.3f}; "
        f"CE {before['cross_entropy']:.4f} → {after['cross_entropy']:.4f} ({cost:+.2f} %)",
        highlight=False,
    )
    verdict = "published (served and exported)" if stats["published"] else "kept, not published"
    out.print(f"version {stats['version']}: {verdict} — {stats['judgement']}", highlight=False)
