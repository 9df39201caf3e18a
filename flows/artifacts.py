"""What the flow run's page shows: a markdown report and tables (Prefect artifacts).

Markdown: each stage ran or skipped, with its time; per-layer figures of cluster and distill; the
validation report when the validate stage exists. Tables: variant × metrics (validate), layer ×
figures (cluster, distill).
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.rundir import RunDir

CLUSTER_FIGURES = ("variance_kept", "size_min", "size_max", "mse", "matched_share", "seconds")
DISTILL_FIGURES = ("val_loss", "val_gini", "val_topk_agreement", "seconds")


def layer_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per MoE layer with the cluster and distill figures of this run's manifests."""
    rows: dict[str, dict[str, Any]] = {}
    for stage, figures in (("cluster", CLUSTER_FIGURES), ("distill", DISTILL_FIGURES)):
        layers = results.get(stage, {}).get("stats", {}).get("layers", {})
        for layer, summary in layers.items():
            row = rows.setdefault(layer, {"layer": layer})
            row.update({f"{stage}.{key}": summary.get(key) for key in figures if key in summary})
    return list(rows.values())


def run_markdown(run_url: str, results: dict[str, dict[str, Any]], report_md: str | None) -> str:
    lines = [f"# lpr-distill run — `{run_url}`", "", "| stage | outcome | finished (UTC) | seconds |"]
    lines.append("|---|---|---|---|")
    for stage, result in results.items():
        if result["skipped"]:
            what = "skipped (up to date)"
        else:
            reused = sum(layer["reused"] for layer in result.get("layer_results", []))
            what = "ran" + (f" ({reused} layers reused)" if reused else "")
        lines.append(f"| {stage} | {what} | {result['finished_at']} | {result['seconds']:.1f} |")
    if rows := layer_rows(results):
        keys = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["", "## Per layer", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows]
    if report_md:
        lines += ["", report_md]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def publish(run: RunDir, results: dict[str, dict[str, Any]]) -> None:
    """Create the run's artifacts (keys are stable, so the UI keeps a history per key)."""
    report_md = None
    if "validate" in results:
        report_md = run.read_text(run.path("report", "report.md"))
    create_markdown_artifact(run_markdown(run.url, results, report_md), key="lpr-distill-run", description=run.url)
    if rows := layer_rows(results):
        create_table_artifact(rows, key="lpr-distill-layers", description="per MoE layer: cluster and distill")
    variants = results.get("validate", {}).get("stats", {}).get("summary")
    if variants:
        create_table_artifact(variants, key="lpr-distill-variants", description="routing variant × metrics (held-out)")
