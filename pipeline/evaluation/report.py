"""The validation report's content: the summary table, the comparison at equal balance, the winner.

Pure functions over the measured results (no I/O): ``pipeline/validate.py`` measures,
``storage/report.py`` writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.evaluation.slices import slices_markdown

BASELINES = ("original", "original+bias", "lpr-init")


def delta_pct(ce: float, base: float) -> float:
    return (ce / base - 1) * 100


def curve_point(label: str, result: dict[str, Any]) -> dict[str, Any]:
    """One point of a frontier curve: the figures a reader compares at a glance."""
    mean = result["mean"]
    return {
        "label": label,
        "gini": mean["slot"]["gini"],
        "min_max": mean["slot"]["min_max"],
        "cv": mean["slot"]["cv"],
        "soft_gini": mean["soft"]["gini"],
        "topk_agreement": mean["topk_agreement"],
        "cross_entropy": result["cross_entropy"],
        "perplexity": result["perplexity"],
    }


def pareto(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve's efficient points (no other point is both more balanced and lower in loss), by Gini."""
    ordered = sorted(curve, key=lambda p: (p["gini"], p["cross_entropy"]))
    front: list[dict[str, Any]] = []
    for point in ordered:
        if not front or point["cross_entropy"] < front[-1]["cross_entropy"]:
            front.append(point)
    return front


def interpolate_ce(curve: list[dict[str, Any]], gini: float) -> float | None:
    """Cross-entropy of a curve's efficient points at a given mean Gini (linear between them); None
    when the curve reaches no Gini that low (or that high)."""
    front = pareto(curve)
    xs = np.array([p["gini"] for p in front])
    ys = np.array([p["cross_entropy"] for p in front])
    if len(xs) == 0 or gini < xs.min() or gini > xs.max():
        return None
    return float(np.interp(gini, xs, ys))


def compare_at_balance(variants: dict[str, dict], bias_curve: list[dict]) -> dict[str, Any] | None:
    """LPR's cross-entropy increase against the bias baseline's at the same mean Gini (on the bias curve)."""
    if "lpr" not in variants or "original" not in variants or not bias_curve:
        return None
    base = variants["original"]["cross_entropy"]
    lpr = curve_point("lpr", variants["lpr"])
    bias_ce = interpolate_ce(bias_curve, lpr["gini"])
    most_balanced = pareto(bias_curve)[0]
    out: dict[str, Any] = {
        "lpr_gini": lpr["gini"],
        "lpr_min_max": lpr["min_max"],
        "lpr_delta_ce_pct": delta_pct(lpr["cross_entropy"], base),
        "bias_delta_ce_pct_at_same_gini": None if bias_ce is None else delta_pct(bias_ce, base),
        "ratio": None,
        "bias_most_balanced": {
            "strength": most_balanced.get("strength"),
            "gini": most_balanced["gini"],
            "delta_ce_pct": delta_pct(most_balanced["cross_entropy"], base),
        },
    }
    if bias_ce is None:
        out["note"] = (
            f"the bias baseline reaches no Gini below {most_balanced['gini']:.3f} over its strengths; at that "
            f"balance it costs {out['bias_most_balanced']['delta_ce_pct']:+.2f} %"
        )
    elif bias_ce > base:
        out["ratio"] = (lpr["cross_entropy"] - base) / (bias_ce - base)
    return out


def native_against_bias(variants: dict[str, dict], bias_curve: list[dict]) -> dict[str, Any] | None:
    """The drop-in ``native`` routers against ``original+bias`` (where a choice bias can start them): on
    both axes, the Gini beside its document floor, and the bias curve's CE at native's Gini."""
    if "native" not in variants or "original+bias" not in variants or "original" not in variants:
        return None
    base = variants["original"]["cross_entropy"]
    native, bias = curve_point("native", variants["native"]), curve_point("original+bias", variants["original+bias"])
    floor = variants["native"]["mean"]["slot"].get("document_interval", {}).get("noise_gini")
    no_worse = native["gini"] <= bias["gini"] and native["cross_entropy"] <= bias["cross_entropy"]
    better = native["gini"] < bias["gini"] or native["cross_entropy"] < bias["cross_entropy"]
    worse = native["gini"] >= bias["gini"] and native["cross_entropy"] >= bias["cross_entropy"]
    bias_ce = interpolate_ce(bias_curve, native["gini"]) if bias_curve else None
    return {
        "native_gini": native["gini"],
        "native_gini_floor": floor,
        "native_min_max": native["min_max"],
        "native_delta_ce_pct": delta_pct(native["cross_entropy"], base),
        "bias_gini": bias["gini"],
        "bias_delta_ce_pct": delta_pct(bias["cross_entropy"], base),
        "bias_delta_ce_pct_at_same_gini": None if bias_ce is None else delta_pct(bias_ce, base),
        "verdict": "dominates" if no_worse and better else ("dominated" if worse else "trade-off"),
    }


def native_sentence(native: dict[str, Any]) -> str:
    """report.md's line on the drop-in routers against the bias baseline."""
    floor = "" if native["native_gini_floor"] is None else f" (document floor {native['native_gini_floor']:.3f})"
    line = (
        f"Drop-in `native` routers: mean Gini {native['native_gini']:.3f}{floor}, min/max "
        f"{native['native_min_max']:.2f}, {native['native_delta_ce_pct']:+.2f} % held-out CE; `original+bias`: Gini "
        f"{native['bias_gini']:.3f}, {native['bias_delta_ce_pct']:+.2f} % — "
    )
    line += {
        "dominates": "native is no worse on either axis and better on one.",
        "dominated": "original+bias is no worse on either axis: it wins.",
        "trade-off": "a trade-off (each is better on one axis).",
    }[native["verdict"]]
    if native["bias_delta_ce_pct_at_same_gini"] is not None:
        line += f" The bias curve at native's Gini costs {native['bias_delta_ce_pct_at_same_gini']:+.2f} %."
    return line


def frontier_dominance(lpr_curve: list[dict], bias_curve: list[dict], base: float) -> dict[str, Any]:
    """Which points of each curve the other beats on both axes (mean Gini and held-out CE no higher, one
    lower): the frontier comparison in words, with no interpolation between settings."""

    def beats(a: dict, b: dict) -> bool:
        no_worse = a["gini"] <= b["gini"] and a["cross_entropy"] <= b["cross_entropy"]
        return no_worse and (a["gini"] < b["gini"] or a["cross_entropy"] < b["cross_entropy"])

    bias_beaten = [b["label"] for b in bias_curve if any(beats(p, b) for p in lpr_curve)]
    lpr_beaten = [p["label"] for p in lpr_curve if any(beats(b, p) for b in bias_curve)]
    reach = min(p["gini"] for p in bias_curve)
    lower = [p for p in lpr_curve if p["gini"] < reach]
    sentence = (
        f"LPR settings beat {len(bias_beaten)} of {len(bias_curve)} bias strengths on both Gini and CE"
        + (f" (strength {', '.join(bias_beaten)})" if bias_beaten else "")
        + f"; bias strengths beat {len(lpr_beaten)} of {len(lpr_curve)} LPR settings"
        + (f" (balance {', '.join(lpr_beaten)})" if lpr_beaten else "")
        + "."
    )
    if lower:
        best = min(lower, key=lambda p: p["cross_entropy"])
        cost = delta_pct(best["cross_entropy"], base)
        sentence += (
            f" Below the bias's lowest Gini ({reach:.3f}) only LPR goes: {len(lower)} settings, the cheapest "
            f"(balance {best['label']}) at Gini {best['gini']:.3f} for {cost:+.2f} % CE."
        )
    return {"bias_beaten_by_lpr": bias_beaten, "lpr_beaten_by_bias": lpr_beaten, "sentence": sentence}


def pick_winner(variants: dict[str, dict], max_gini: float) -> dict[str, Any]:
    """Lowest held-out cross-entropy among variants with mean slot Gini ≤ ``max_gini`` (the original
    gate competes too, when it is that balanced); if none is, the most balanced variant."""
    criterion = f"lowest held-out cross-entropy among variants with mean slot Gini ≤ {max_gini:g}"
    eligible = {n: r for n, r in variants.items() if r["mean"]["slot"]["gini"] <= max_gini}
    if eligible:
        name = min(eligible, key=lambda n: eligible[n]["cross_entropy"])
    else:
        criterion = f"no variant reaches mean slot Gini ≤ {max_gini:g}: the most balanced one"
        name = min(variants, key=lambda n: variants[n]["mean"]["slot"]["gini"])
    baseline = name in BASELINES
    result = variants[name]
    figures = f"held-out CE {result['cross_entropy']:.4f}, mean slot Gini {result['mean']['slot']['gini']:.3f}"
    sentence = f"Winner ({criterion}): **{name}** ({figures})."
    if baseline:
        sentence += f" A baseline wins: {name} is not the distilled LPR."
    return {"criterion": criterion, "name": name, "is_baseline": baseline, "sentence": sentence}


def summary_rows(variants: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per variant: the figures of the summary table (means over layers)."""
    base = variants.get("original", next(iter(variants.values())))["cross_entropy"]
    rows = []
    for name, result in variants.items():
        mean = result["mean"]
        row = {
            "variant": name,
            "gini": mean["slot"]["gini"],
            "gini_documents": mean["slot"].get("document_interval", {}).get("gini"),
            "gini_floor": mean["slot"].get("document_interval", {}).get("noise_gini"),
            "min_max": mean["slot"]["min_max"],
            "cv": mean["slot"]["cv"],
            "soft_gini": mean["soft"]["gini"],
            "idle_experts": mean["slot"]["idle_experts"],
            "overflow_1x": mean["overflow"].get("1x"),
            "ep_8": mean["ep_balancedness"].get("8"),
            "cross_entropy": result["cross_entropy"],
            "delta_ce_pct": delta_pct(result["cross_entropy"], base),
            "perplexity": result["perplexity"],
            "topk_agreement": mean["topk_agreement"],
        }
        for task, figures in result.get("tasks", {}).items():
            row[f"task:{task}"] = figures.get("acc")
        rows.append(row)
    return rows


def interval_text(interval: list[float] | None, digits: int = 3) -> str:
    """[low, high] as "low–high" (— when absent): the report, the CLI table and the benchmark."""
    return "—" if not interval else "–".join(f"{v:.{digits}f}" for v in interval)


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, list):  # a list is an interval
        return interval_text(value, digits)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    headers = {
        "variant": "variant",
        "gini": "Gini",
        "gini_documents": "Gini 90 % (docs)",
        "gini_floor": "Gini floor (docs)",
        "min_max": "min/max",
        "cv": "CV",
        "soft_gini": "soft Gini",
        "overflow_1x": "overflow @1.0×",
        "ep_8": "EP bal. (8 dev.)",
        "cross_entropy": "CE",
        "delta_ce_pct": "Δ CE %",
        "perplexity": "perplexity",
        "topk_agreement": "top-k agreement",
    }
    tasks = [key for key in rows[0] if key.startswith("task:")] if rows else []
    columns = list(headers) + tasks
    titles = [headers.get(c, f"{c.removeprefix('task:')} acc") for c in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            digits = 2 if c in ("delta_ce_pct", "perplexity") else (4 if c == "cross_entropy" else 3)
            text = _cell(row.get(c), digits)
            cells.append(f"{'+' if c == 'delta_ce_pct' and row[c] > 0 else ''}{text}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was measured, the summary table, the comparison at equal balance, the winner."""
    held = report["heldout"]
    parts = [
        f"# Validation report — {report['run']}",
        "",
        f"Model `{report['model']}`; {held['sequences']} held-out sequences ({held['tokens']:,} tokens) from "
        f"{held.get('documents', 'the')} documents never dumped, clustered, distilled or calibrated on. "
        f"Figures are means over {report['layers']} MoE layers (per-layer figures in report.json).",
        "",
        markdown_table(report["summary"]),
        "",
        report["winner"]["sentence"],
    ]
    slices = report.get("slices") or {}
    named = report["winner"]["name"] if report["winner"]["name"] in slices.get("worst", {}) else "lpr"
    worst = slices.get("worst", {}).get(named)
    if worst is not None:
        f = slices["variants"][named][worst]
        parts += [
            "",
            f"Worst traffic slice for {named}: **{worst}** — Gini {f['gini']:.3f} against its document floor "
            f"{f['floor']:.3f}, min/max {f['min_max']:.2f} ({f['documents']} held-out documents; "
            "[per slice](#balance-per-traffic-slice)).",
        ]
    if report["variants"].get("lpr", {}).get("build", {}).get("init") == "gate":
        parts += ["", "`lpr` was distilled from the model's own gates (`router.init: gate`), not from the clusters."]
    comparison = report.get("comparison")
    if comparison:
        bias = comparison["bias_delta_ce_pct_at_same_gini"]
        line = (
            f"At LPR's balance (mean Gini {comparison['lpr_gini']:.3f}, min/max {comparison['lpr_min_max']:.2f}) "
            f"LPR costs {comparison['lpr_delta_ce_pct']:+.2f} % held-out CE"
        )
        if bias is None:
            line += f"; {comparison.get('note', 'the bias baseline has no point there')}."
        else:
            line += f"; the bias baseline at the same Gini costs {bias:+.2f} % (interpolated over its strength)."
            if comparison["ratio"] is not None:
                line += f" LPR's increase is {comparison['ratio']:.2f}× the baseline's."
        parts += ["", line]
    if report.get("native"):
        parts += ["", native_sentence(report["native"])]
    if report.get("frontier"):
        parts += ["", f"Frontier (`lpr-distill sweep`): {report['frontier']['sentence']}"]
    parts += ["", *slices_markdown(slices)] if slices.get("variants") else []
    parts += [
        "",
        "Columns: Gini, min/max and CV of top-k slots per expert; Gini 90 % (docs) = the central 90 % of that "
        "Gini over 1,000 resamplings of the held-out documents (how much the figure owes to which documents were "
        "held out); Gini floor (docs) = the Gini that a router balanced over the whole population of such "
        "documents would still show on these (each document's own expert mix kept, the pool moved to even "
        "shares; mean over the same resamplings): a Gini near its floor is as even as these documents can show; "
        "soft Gini of routing-weight mass; overflow = share "
        "of slots over a capacity of 1.0× the mean load per batch; EP bal. = mean/max device load with the experts "
        "split evenly over 8 devices; top-k agreement with the original gate on the same router input.",
        "",
        "![expert load](load_heatmap.png)",
        "",
        "![Gini per layer](gini_per_layer.png)",
        "",
        "![frontier](frontier.png)",
        "",
    ]
    return "\n".join(parts)
