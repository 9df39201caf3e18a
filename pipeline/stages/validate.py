"""The validate stage: every routing variant swapped into the same model, measured on held-out text
and downstream tasks, against the baselines → ``report/`` (report.json, report.md, PNG plots).

Per variant (``validate.variants``, registry in ``pipeline/variants.py``): held-out cross-entropy and
perplexity, per-layer and mean load figures (``pipeline/metrics.py``), top-k agreement with the
original gate, and the lm-eval tasks of ``validate.tasks``. The bias baseline is also swept over
its strength (a curve on the quality/balance frontier, and LPR's cost is compared with it at the
same Gini); a frontier sweep of the distillation (``lpr-distill sweep``) adds LPR's curve.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.evaluation.downstream import evaluate_tasks, require_lm_eval
from pipeline.evaluation.heldout import HeldOut, heldout_sequences, measure
from pipeline.evaluation.plots import frontier, gini_per_layer, load_heatmaps, require_matplotlib
from pipeline.evaluation.report import (
    compare_at_balance,
    curve_point,
    frontier_dominance,
    markdown,
    native_against_bias,
    pick_winner,
    summary_rows,
)
from pipeline.evaluation.slices import measure_slices, slice_heldouts, slices_report
from pipeline.evaluation.variants import VARIANTS, VariantSwitcher, check_variants, scale_bias
from pipeline.moe.loading import load_config, load_model, model_identity, resolve_model_path
from pipeline.progress import info
from pipeline.stages.native_form import ensure_native_form
from pipeline.stages.protocol import build_manifest, previous_run
from storage.derived_run import native_form_run
from storage.report import to_json, write_files
from storage.rundir import Manifest, RunDir, fingerprint
from storage.versions import served_version

STAGE = "validate"
SWEEP_RESULTS = ("sweep", "frontier.json")  # written by `lpr-distill sweep` (pipeline/sweep.py)


def variant_names(cfg: RunConfig) -> list[str]:
    """``validate.variants``, and "checkpoint" after them when ``validate.checkpoint`` names a directory."""
    names = list(cfg.validate.variants)
    return [*names, "checkpoint"] if cfg.validate.checkpoint and "checkpoint" not in names else names


def checkpoint_identity(directory: str) -> dict[str, Any]:
    """What the report measured of an exported checkpoint: its weight files' sizes and modification times."""
    files = sorted(Path(directory).glob("*.safetensors"))
    return {
        "directory": str(Path(directory).resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def check_inputs(cfg: RunConfig, run: RunDir) -> None:
    """Everything that can be wrong before any model work: one-line errors."""
    if not run.is_complete("dump"):
        raise LprError(f"run directory {run.url} has no complete dump", "run `lpr-distill dump RUN_DIR` first")
    check_variants(variant_names(cfg), run)
    if "checkpoint" in cfg.validate.variants and not cfg.validate.checkpoint:
        raise LprError("validate.variants names 'checkpoint' but no directory", "pass --checkpoint DIR")
    if cfg.validate.checkpoint and not Path(cfg.validate.checkpoint).is_dir():
        raise LprError(
            f"--checkpoint {cfg.validate.checkpoint} is not a directory", "pass what `export --checkpoint` wrote"
        )
    if "original" not in cfg.validate.variants:
        raise LprError("validate.variants must include 'original'", "add it: every comparison is against it")
    require_matplotlib()
    if cfg.validate.tasks:
        require_lm_eval()


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict[str, Any]:
    """What the report depends on: the model, and the fingerprints of the stages the variants read."""
    inputs: dict[str, Any] = {"model": model_identity(resolve_model_path(cfg), cfg.model.revision)}
    for stage in ("dump", "cluster", "distill"):
        manifest = run.read_manifest(stage)
        if manifest is not None and run.is_complete(stage):
            inputs[stage] = manifest.fingerprint
    sweep = run.read_json(run.path(*SWEEP_RESULTS))
    if sweep is not None:
        inputs["sweep"] = fingerprint({}, {"points": sweep.get("lpr", [])})
    native = native_form_run(run)
    if "native" in cfg.validate.variants and native.is_complete("distill"):
        inputs["native_distill"] = native.read_manifest("distill").fingerprint
    if version := served_version(run):  # a recalibrated version is served as `lpr`
        inputs["routers_version"] = version
    if cfg.validate.checkpoint:
        inputs["checkpoint"] = checkpoint_identity(cfg.validate.checkpoint)
    return inputs


def measure_variants(cfg: RunConfig, run: RunDir) -> tuple[dict[str, dict], list[dict], dict[str, Any]]:
    """Load the model once; measure each variant, and the bias baseline over its strengths.

    Returns (results by variant, bias curve points, held-out description).
    """
    v = cfg.validate
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    held = heldout_sequences(cfg, tokenizer, v.sequences)
    slices = slice_heldouts(cfg, tokenizer)
    switcher = VariantSwitcher(model)
    results: dict[str, dict] = {}
    bias_curve: list[dict] = []
    names = variant_names(cfg)
    for position, name in enumerate(names, start=1):
        started = time.time()
        info(f"[bold]validate[/] {name} ({position}/{len(names)}): building routers")
        built = switcher.apply(name, cfg, run)
        result = measure(model, held, cfg=cfg, teachers=switcher.originals)
        result["slices"] = measure_slices(model, slices, cfg=cfg, teachers=switcher.originals)
        result["description"] = VARIANTS[name].description
        result["build"] = built.info
        if v.tasks:
            info(f"[bold]validate[/] {name}: lm-eval {', '.join(v.tasks)}")
            result["tasks"] = evaluate_tasks(
                model,
                tokenizer,
                v.tasks,
                batch_size=v.eval_batch_size,
                limit=v.task_limit,
                max_length=min(getattr(model.config, "max_position_embeddings", 2048), 2048),
            )
        if name == "original+bias" and v.bias_strengths:
            measured = {1.0: result} | ({0.0: results["original"]} if "original" in results else {})
            bias_curve = bias_strength_curve(cfg, model, held, built.routers, switcher.originals, measured)
        result["seconds"] = round(time.time() - started, 2)
        results[name] = result
        tasks = "".join(f"; {t} acc {r.get('acc', float('nan')):.3f}" for t, r in result.get("tasks", {}).items())
        slot = result["mean"]["slot"]
        info(
            f"[bold]validate[/] {name}: CE {result['cross_entropy']:.4f}, Gini {slot['gini']:.3f}, "
            f"min/max {slot['min_max']:.2f}{tasks} ({result['seconds']:.0f} s)"
        )
    switcher.restore()
    heldout = {
        "sequences": len(held.ids),
        "tokens": int(held.ids.numel()),
        "documents": int(np.unique(held.documents).size),
        "seq_len": cfg.corpus.seq_len,
        "heldout_fraction": cfg.corpus.heldout_fraction,
    }
    return results, bias_curve, heldout


def bias_strength_curve(
    cfg: RunConfig,
    model: Any,
    held: HeldOut,
    routers: dict,
    teachers: dict,
    measured: dict[float, dict] | None = None,
) -> list[dict]:
    """The bias baseline at ``validate.bias_strengths`` × its calibrated bias (the model holds ``routers``).

    measured: held-out results already in hand by strength (0: the original gate, 1: the calibrated
    bias itself), used instead of measuring the same routing again (one held-out pass each).
    """
    calibrated = {name: router.bias.detach().clone() for name, router in routers.items()}
    curve = []
    for strength in cfg.validate.bias_strengths:
        result = (measured or {}).get(strength)
        if result is None:
            scale_bias(routers, calibrated, strength)
            result = measure(model, held, cfg=cfg, teachers=teachers)
        curve.append(curve_point(f"{strength:g}", result) | {"strength": strength})
    scale_bias(routers, calibrated, 1.0)
    info(f"[bold]validate[/] original+bias over strengths {cfg.validate.bias_strengths}: done")
    return curve


def build_report(
    cfg: RunConfig, run: RunDir, results: dict, bias_curve: list[dict], heldout: dict, sweep: dict | None
) -> dict[str, Any]:
    lpr_curve = sweep.get("lpr") if sweep else None
    slices = slices_report(cfg, {name: result.pop("slices", {}) for name, result in results.items()})
    return {
        "run": run.url,
        "model": cfg.model.path,
        "layers": len(next(iter(results.values()))["layers"]),
        "heldout": heldout,
        "variants": results,
        "summary": summary_rows(results),
        "bias_curve": bias_curve,
        "lpr_sweep": lpr_curve,
        "comparison": compare_at_balance(results, bias_curve),
        "native": native_against_bias(results, bias_curve),
        "frontier": frontier_dominance(lpr_curve, bias_curve, results["original"]["cross_entropy"])
        if lpr_curve and bias_curve and "original" in results
        else None,
        "winner": pick_winner(results, cfg.validate.max_gini),
        "slices": slices,
        "config": cfg.section("validate"),
    }


def report_files(report: dict[str, Any]) -> dict[str, str | bytes]:
    results = report["variants"]
    curves = {}
    if report["bias_curve"]:
        curves["original+bias (strength ×)"] = report["bias_curve"]
    if report["lpr_sweep"]:
        curves["lpr (distill.balance)"] = report["lpr_sweep"]
    points = {name: curve_point(name, result) for name, result in results.items()}
    return {
        "report.json": to_json(report),
        "report.md": markdown(report),
        "load_heatmap.png": load_heatmaps(results),
        "gini_per_layer.png": gini_per_layer(results),
        "frontier.png": frontier(curves, points),
    }


def run_validate(*, cfg: RunConfig, run: RunDir, force: bool = False) -> Manifest:
    """Write ``report/``: every variant measured on held-out documents and downstream tasks."""
    check_inputs(cfg, run)
    load_config(cfg.model, resolve_model_path(cfg))  # the model loads and is a supported MoE
    started = time.time()
    if "native" in cfg.validate.variants:
        ensure_native_form(cfg, run)  # before the fingerprint: it covers what the variant reads
    config = {"seed": cfg.seed, **cfg.section("corpus", "router", "validate")}
    inputs = stage_inputs(cfg, run)
    fp = fingerprint(config, inputs)
    if (done := previous_run(run, STAGE, fp, force=force)) is not None:
        return done.model_copy(update={"skipped": True})
    results, bias_curve, heldout = measure_variants(cfg, run)
    sweep = run.read_json(run.path(*SWEEP_RESULTS))
    report = build_report(cfg, run, results, bias_curve, heldout, sweep)
    partial = run.partial_path(STAGE)
    if run.fs.exists(partial):
        run.fs.rm(partial, recursive=True)
    names = write_files(run, partial, report_files(report))
    stats = {"summary": report["summary"], "winner": report["winner"], "comparison": report["comparison"]}
    outputs = {"report": "report", "files": names}
    manifest = build_manifest(stage=STAGE, config=config, inputs=inputs, outputs=outputs, stats=stats, started=started)
    run.commit(STAGE, manifest)
    info(f"[bold]validate[/]: report → {run.url_of(run.output_path(STAGE))}/report.md")
    return manifest
