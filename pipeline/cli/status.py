"""What a run directory holds: which stages are complete, and the shape of the states store."""

from __future__ import annotations

from typing import Any

from pipeline.errors import LprError
from pipeline.router.provenance import distilled_from
from storage.rundir import STAGES, RunDir
from storage.states import StatesReader
from storage.versions import list_versions, served_version


def _states_summary(run: RunDir, path: str) -> dict[str, Any]:
    try:
        reader = StatesReader(run.url_of(path), run.storage_options)
    except (LprError, KeyError):
        return {}
    rows = reader.num_rows
    return {
        "rows": rows,
        "layers": {name: rows for name in reader.layers},
        "num_experts": reader.attrs.get("num_experts"),
        "top_k": reader.attrs.get("top_k"),
        "hidden_size": reader.attrs.get("hidden_size"),
        "x_dtype": reader.attrs.get("x_dtype"),
        "model": reader.attrs.get("model"),
    }


def _cluster_details(stats: dict[str, Any]) -> str:
    layers = stats.get("layers", {})
    if not layers:
        return ""
    spread = max(row["size_max"] - row["size_min"] for row in layers.values())
    shares = [row["matched_share"] for row in layers.values()]
    return f"{len(layers)} layers, slot counts differ by ≤ {spread}, matched share {min(shares):.0%}–{max(shares):.0%}"


def _distill_details(stats: dict[str, Any]) -> str:
    layers = stats.get("layers", {})
    if not layers:
        return ""
    if distilled_from(layers) == "gate":
        text = f"{len(layers)} layers from the model's own gates (router.init gate)"
    else:
        ginis = [row["val_gini"] for row in layers.values()]
        text = f"{len(layers)} layers; gate level: Gini on held-out chunks {min(ginis):.3f}–{max(ginis):.3f}"
    best = stats.get("model_level", {}).get("best")
    if best:
        text += f"; in the model: best step {best['step']}, val KL {best['kl']:.4f}, Gini {best['gini']:.3f}"
    return text


def _validate_details(stats: dict[str, Any]) -> str:
    winner, rows = stats.get("winner"), {row["variant"]: row for row in stats.get("summary", [])}
    if not winner or winner.get("name") not in rows:
        return ""
    row = rows[winner["name"]]
    text = f"winner {winner['name']}: Gini {row['gini']:.3f}, Δ CE {row['delta_ce_pct']:+.2f} %"
    if winner["name"] != "lpr" and "lpr" in rows:
        text += f" (lpr: Gini {rows['lpr']['gini']:.3f}, Δ CE {rows['lpr']['delta_ce_pct']:+.2f} %)"
    return text


def _export_details(manifest_outputs: dict[str, Any]) -> str:
    return f"{manifest_outputs.get('routers', 0)} routers → {manifest_outputs.get('directory', '')}"


_DETAILS = {"cluster": _cluster_details, "distill": _distill_details, "validate": _validate_details}


def run_status(run: RunDir) -> dict[str, Any]:
    """One JSON-ready object: per stage whether it is complete, its timings, size and details."""
    if not run.fs.exists(run.root):
        raise LprError(f"run directory {run.url} does not exist", "pass the directory a stage wrote into")
    stages: dict[str, Any] = {}
    for stage in STAGES:
        manifest = run.read_manifest(stage)
        complete = run.is_complete(stage)
        entry: dict[str, Any] = {"complete": complete}
        if complete and manifest is not None:
            entry |= {
                "finished_at": manifest.finished_at,
                "seconds": manifest.seconds,
                "bytes": run.output_bytes(stage, manifest),
            }
        elif run.fs.exists(run.partial_path(stage)):
            entry |= {"partial": True, "bytes": run.size_bytes(run.partial_path(stage))}
        if stage == "dump":
            path = run.output_path(stage) if complete else run.partial_path(stage)
            if run.fs.exists(path):
                entry["states"] = _states_summary(run, path)
                rows = entry["states"].get("rows", 0)
                layers = len(entry["states"].get("layers", {}))
                entry["details"] = f"{rows:,} rows × {layers} layers" + ("" if complete else " committed so far")
        if complete and manifest is not None and stage in _DETAILS:
            entry["details"] = _DETAILS[stage](manifest.stats)
        if complete and manifest is not None and stage == "export":
            entry["details"] = _export_details(manifest.outputs)
        stages[stage] = entry
    return {"run_dir": run.url, "stages": stages, "versions": routers_versions(run)}


def routers_versions(run: RunDir) -> list[dict[str, Any]]:
    """Every version of the routers: 0 (the distill stage's), then each recalibration, with the one
    served marked; a version made from an earlier distillation is stale (never served)."""
    distill = run.read_manifest("distill")
    if distill is None or not run.is_complete("distill"):
        return []
    served = served_version(run)
    rows = [{"version": 0, "made_by": "distill", "current": served == 0, "stale": False}]
    for record in list_versions(run):
        rows.append(
            {
                "version": record["version"],
                "made_by": f"recalibrate on {record['traffic']}",
                "parent": record["parent"],
                "current": served == record["version"],
                "stale": record.get("distill") != distill.fingerprint,
                "published": record["published"],
                "gini_before": record["before"]["gini"],
                "gini_after": record["after"]["gini"],
                "judgement": record["judgement"],
                "created_at": record["created_at"],
            }
        )
    return rows
