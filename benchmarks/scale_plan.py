"""From one run of ``benchmarks/scale.py`` to the full model at the default budgets, and the planning table.

Extrapolation (``extrapolate``), stage by stage, from what the run measured on ``L`` MoE layers:

* per-layer stages are measured per layer and multiplied by the full model's MoE layers: the cluster
  stage at the default sample (``cluster-sample``), gate-level distillation with its training steps
  scaled to ``distill.steps`` × ``distill.batch_rows`` and its calibration to ``router.calibration_rows``;
* whole-model stages are split into what the timers saw (model loading, training, calibration,
  held-out passes) and each part is scaled by its work in forward FLOPs, the benchmark's against the
  defaults' on the full model: tokens × FLOPs per token of the layers it runs through
  (``scale_geometries.layer_flops``: 2 × active weights; attention scores and sequence length ignored),
  ×3 for a training step (teacher, student, backward), layer l's calibration pass stopping at l;
  model loading by the weights' bytes. All FLOPs count the same: an estimate for planning, not a promise.

``write_table`` turns the saved results (``benchmarks/results/scale-*.json``) into ``docs/planning.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale_geometries import GEOMETRIES, Geometry, dense_layer_flops, head_flops, layer_flops, model_bytes

from pipeline.config import RunConfig

SHARED_BYTES = 4 + 8 + 4  # token_id int32, doc_id int64, position int32 per token


def _stack(g: Geometry, layers: int, built: bool) -> float:
    """Forward FLOPs per token through the decoder stack (no head)."""
    if built:
        return layers * layer_flops(g, built=True)
    return g.moe_layers * layer_flops(g) + g.dense_layers * dense_layer_flops(g)


def _calibration_pass(g: Geometry, layers: int, built: bool) -> float:
    """FLOPs per token of calibrating every layer once: layer l's pass stops at l (dense layers first)."""
    per = layer_flops(g, built=built)
    dense = 0 if built else g.dense_layers * dense_layer_flops(g)
    return per * layers * (layers + 1) / 2 + dense * layers


def _model_level_work(cfg: RunConfig, g: Geometry, layers: int, built: bool) -> tuple[float, float]:
    """(training work, final calibration work) in FLOPs: the model-level phase at ``cfg``."""
    d, s = cfg.distill, cfg.corpus.seq_len
    full = _stack(g, layers, built) + head_flops(g)
    calibrate = _calibration_pass(g, layers, built)
    train = d.model_steps * d.model_batch_sequences * s * 3 * full
    train += (d.model_steps // d.model_eval_every + 1) * d.model_val_sequences * s * 2 * full
    if d.model_calibrate_every and d.model_steps:
        calibrations = 1 + (d.model_steps - 1) // d.model_calibrate_every
        train += calibrations * min(d.model_calibration_sequences, d.calibration_sequences) * s * calibrate
    return train, d.calibration_sequences * s * calibrate


def heldout_passes(cfg: RunConfig) -> int:
    """Passes of validate over its held-out sequences: one per variant, and one per extra bias strength
    (strengths 0 and 1 are the original gate and original+bias, measured once)."""
    v = cfg.validate
    extra = [s for s in v.bias_strengths if s not in (0.0, 1.0)] if "original+bias" in v.variants else []
    return len(v.variants) + len(extra)


def _seconds(stage: dict[str, Any], key: str) -> float:
    return float(stage.get("timers", {}).get(key, {}).get("seconds", 0.0))


def extrapolate(result: dict[str, Any], bench: RunConfig, default: RunConfig | None = None) -> dict[str, Any]:
    """Hours per stage and disk for the states of the full model at ``default`` (RunConfig()) budgets."""
    default = default or RunConfig()
    g = GEOMETRIES[result["geometry"]]
    layers, stages = result["layers"], result["stages"]
    tokens_b, tokens_d = result["tokens"], default.dump.max_tokens
    load_scale = model_bytes(g) / model_bytes(g, layers=layers, built=True)
    out: dict[str, float] = {}

    dump = stages["dump"]
    loop = dump["loop_seconds"] * (tokens_d * _stack(g, layers, False)) / (tokens_b * _stack(g, layers, True))
    out["dump"] = loop + _seconds(dump, "load") * load_scale

    sample = stages.get("cluster-sample") or stages["cluster"]
    per_layer = sample["seconds_per_layer"]
    out["cluster"] = per_layer * g.moe_layers

    gate = stages["distill-gate"]
    rows_b = min(bench.router.calibration_rows, tokens_b)
    rows_d = min(default.router.calibration_rows, tokens_d)
    steps = (default.distill.steps * default.distill.batch_rows) / (bench.distill.steps * bench.distill.batch_rows)
    rows = _seconds(gate, "init") + _seconds(gate, "bias")  # temperature and bias calibrations on stored rows
    rest = gate["seconds"] - _seconds(gate, "train") - rows  # start-up, reads, writes
    out["distill-gate"] = (_seconds(gate, "train") * steps + rows * rows_d / rows_b) * g.moe_layers / layers + rest

    model = stages["distill-model"]
    train_b, calib_b = _model_level_work(bench, g, layers, True)
    train_d, calib_d = _model_level_work(default, g, g.moe_layers, False)
    final_calibration = _seconds(model, "calibrate") - _seconds(model, "train>calibrate")
    rest = model["seconds"] - _seconds(model, "load") - _seconds(model, "train") - final_calibration
    out["distill-model"] = _seconds(model, "train") * train_d / train_b + rest + _seconds(model, "load") * load_scale
    out["distill-model"] += final_calibration * calib_d / calib_b
    out["calibration"] = final_calibration * calib_d / calib_b  # the final calibration, part of distill-model

    val = stages["validate"]
    v_b, v_d = bench.validate, default.validate
    held_b = heldout_passes(bench) * v_b.sequences * bench.corpus.seq_len * (_stack(g, layers, True) + head_flops(g))
    held_d = heldout_passes(default) * v_d.sequences * default.corpus.seq_len
    held_d *= _stack(g, g.moe_layers, False) + head_flops(g)
    lpr_init = _seconds(val, "lpr-init") * g.moe_layers / layers * rows_d / rows_b
    rest = val["seconds"] - sum(_seconds(val, k) for k in ("load", "heldout", "calibrate", "lpr-init"))
    out["validate"] = (
        _seconds(val, "heldout") * held_d / held_b
        + _seconds(val, "calibrate") * calib_d / calib_b
        + lpr_init
        + _seconds(val, "load") * load_scale
        + rest
    )
    out["export"] = stages["export"]["seconds"] - _seconds(stages["export"], "load") * (1 - load_scale)

    work = {  # forward-equivalent FLOPs of the whole-model stages at the defaults: divide by a GPU's rate
        "dump": tokens_d * _stack(g, g.moe_layers, False),
        "distill-model": train_d + calib_d,
        "calibration": calib_d,
        "validate": held_d + calib_d,
    }
    layer_bytes = (dump["bytes"] - SHARED_BYTES * tokens_b) / (tokens_b * layers)
    states = tokens_d * (SHARED_BYTES + g.moe_layers * layer_bytes)
    return {
        "hours": {k: round(v / 3600, 2) for k, v in out.items()},
        "pflop": {k: round(v / 1e15, 1) for k, v in work.items()},
        "states_gb": round(states / 1e9, 1),
        "state_bytes_per_token_layer": round(layer_bytes, 1),
        "model_gb_bf16": round(model_bytes(g) / 1e9, 1),
        "tokens": tokens_d,
        "moe_layers": g.moe_layers,
    }


BOUNDS = {
    "dump": "the model; dump.batch_tokens",
    "cluster": "cluster.sample_rows × (latent + experts); cluster.block_rows × hidden; hidden² (PCA)",
    "distill-gate": "distill.buffer_rows × hidden; router.calibration_rows × experts",
    "distill-model": "the model; distill.model_batch_sequences × seq_len × vocab; "
    "distill.calibration_sequences × seq_len × experts",
    "validate": "the model; validate.batch_size × seq_len × vocab; distill.calibration_sequences × seq_len × experts",
    "export": "the model (loading the exported routers into it)",
}


def is_planning_run(r: dict[str, Any]) -> bool:
    """A run at the geometry's defaults (2 MoE layers, its token budget): what the planning table shows."""
    return (r["layers"], r["tokens"]) == (2, GEOMETRIES[r["geometry"]].tokens)


def write_table(results: list[dict[str, Any]], path: Path) -> None:
    """``docs/planning.md`` from saved benchmark results (one JSON object each)."""
    d = RunConfig()
    plans = sorted(filter(is_planning_run, results), key=lambda r: list(GEOMETRIES).index(r["geometry"]))
    lines = [
        "# Planning a run",
        "",
        "Generated by `python benchmarks/scale.py --table` from `benchmarks/results/scale-*.json` (each one run",
        "of `benchmarks/scale.py`, whose docstring says what it builds and runs); do not edit by hand.",
        "",
        "## Full model at the default budgets",
        "",
        f"{d.dump.max_tokens:,} dumped tokens, `cluster.sample_rows` {d.cluster.sample_rows:,}, `distill.steps` "
        f"{d.distill.steps}, `distill.model_steps` {d.distill.model_steps} × {d.distill.model_batch_sequences} "
        f"sequences, `distill.calibration_sequences` {d.distill.calibration_sequences}, `validate.sequences` "
        f"{d.validate.sequences}, `corpus.seq_len` {d.corpus.seq_len}. Hours on the machine each run names, in",
        "float32, extrapolated from a run on 2 MoE layers (`benchmarks/scale_plan.py` says how: per-layer stages",
        "per layer, whole-model stages by their forward FLOPs). Whole-model stages hold the model in memory: on",
        "a CPU 4 bytes per weight, so of these only OLMoE-1B-7B fits 24 GB; plan them on GPUs.",
        "",
        "| geometry | MoE layers | states on disk | model (bf16) | dump h | cluster h | gate-level h | "
        "model-level h | of which calibration h | validate h | measured on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in plans:
        e, h = r["full_model"], r["full_model"]["hours"]
        lines.append(
            f"| {r['geometry']} | {e['moe_layers']} | {e['states_gb']} GB | {e['model_gb_bf16']} GB | {h['dump']} | "
            f"{h['cluster']} | {h['distill-gate']} | {h['distill-model']} | {h['calibration']} | {h['validate']} | "
            f"{r['device']}, load {r['load_average']}, {r['date']}, {r['commit']} |"
        )
    lines += [
        "",
        "Work of the whole-model stages at the same budgets, in PFLOP (forward-equivalent, as the extrapolation",
        "counts it): divided by a GPU's sustained rate it gives a lower bound on the GPU hours (an H100 at 40 %",
        "of its 990 dense bfloat16 TFLOP/s does about 1,400 PFLOP an hour).",
        "",
        "| geometry | dump | model-level distillation | of which calibration | validate |",
        "|---|---|---|---|---|",
    ]
    for r in plans:
        w = r["full_model"].get("pflop", {})
        lines.append(
            f"| {r['geometry']} | {w.get('dump')} | {w.get('distill-model')} | {w.get('calibration')} | "
            f"{w.get('validate')} |"
        )
    lines += [
        "",
        "## Measured",
        "",
        "Each stage in its own process on the benchmark's model (2 MoE layers; `tokens` dumped): wall and CPU",
        "seconds, peak RSS (VmHWM: the checkpoint's file pages mapped while the model loads count in it),",
        "peak anonymous memory (RssAnon, sampled every 0.2 s: the process's own), bytes written.",
        "`cluster-sample`: one layer clustered at the default sample (262,144 rows): the cluster seconds per layer.",
        "",
        "| geometry | stage | seconds | CPU s | peak RSS MiB | anonymous MiB | bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in plans:
        for name, stage in r["stages"].items():
            anonymous = stage.get("peak_anonymous_mib")
            lines.append(
                f"| {r['geometry']} ({r['tokens']:,} tokens) | {name} | {stage['seconds']} | "
                f"{stage.get('cpu_seconds', '')} | {stage['peak_rss_mib']:,.0f} | "
                f"{'' if anonymous is None else f'{anonymous:,.0f}'} | {stage['bytes']:,} |"
            )
    checks = memory_checks(results)
    if checks:
        lines += ["", "## Memory against the work", "", *checks]
    lines += ["", "## What bounds each stage's memory", "", "Config keys; none is the token budget:", ""]
    lines += [f"- **{stage}**: {text}" for stage, text in BOUNDS.items()]
    notes = [f"- **{r['geometry']}**: {r['reduced']}" for r in plans if r.get("reduced")]
    if notes:
        lines += ["", "## Built below the published geometry", "", *notes]
    path.write_text("\n".join(lines) + "\n")


def load_results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("scale-*.json"))]


def memory_checks(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per geometry run at twice the tokens or twice the layers of its planning run, each
    stage's peak RSS against the planning run's (bars: ±10 % for 2× tokens; per-layer stages ±10 % for
    2× layers; whole-model stages may grow by at most the float32 weights of the added layers)."""
    lines = []
    plans = {r["geometry"]: r for r in results if is_planning_run(r)}
    for r in results:
        base = plans.get(r["geometry"])
        if base is None or r is base:
            continue
        g = GEOMETRIES[r["geometry"]]
        what = f"{r['tokens'] / base['tokens']:g}× the tokens" if r["layers"] == base["layers"] else ""
        what = what or f"{r['layers']} instead of {base['layers']} layers"
        added = (
            model_bytes(g, layers=r["layers"], built=True, dtype_bytes=4)
            - model_bytes(g, layers=base["layers"], built=True, dtype_bytes=4)
        ) / 2**20
        lines.append(f"{r['geometry']}, {what} (the added layers' float32 weights: {added:,.0f} MiB):")
        lines.append("")
        lines += [
            "| stage | peak RSS MiB | planning run | change | anonymous MiB | planning run | growth MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, stage in r["stages"].items():
            if name in base["stages"]:
                before = base["stages"][name]
                change = stage["peak_rss_mib"] / before["peak_rss_mib"] - 1
                row = f"| {name} | {stage['peak_rss_mib']:,.0f} | {before['peak_rss_mib']:,.0f} | {change:+.1%} |"
                anon, anon_before = stage.get("peak_anonymous_mib"), before.get("peak_anonymous_mib")
                if anon is not None and anon_before is not None:
                    row += f" {anon:,.0f} | {anon_before:,.0f} | {anon - anon_before:+,.0f} |"
                else:
                    row += "  |  |  |"
                lines.append(row)
        lines += [
            "",
            "Peak RSS counts the checkpoint's file pages mapped while the model loads; the anonymous memory is",
            "the process's own, which is what grows by at most the added weights.",
            "",
        ]
    return lines
