"""Recalibrate: the served routers' choice bias recomputed on the user's traffic, as a new version.

Balance is a property of router *and* traffic: a bias calibrated on the corpus's mix keeps much of
the original imbalance on a stream of another kind. This recomputes only the per-expert choice bias
of the stored routers (routers distilled in the family's own form, ``router.form: native``: the
balance where the family carries it, ``router.native_balance``), in the model, layer by layer, on
training-side sequences of the traffic sample (split by the same document hash as every corpus),
and judges the result against the version before on the traffic's held-out documents. The new
version is always kept (``storage.versions``); it is published — served by ``validate``, exported
to the run's ``lpr/`` and, where the run shipped a drop-in checkpoint, written as a new one beside
it — when ``recalibrate.publish`` says so (``better``: lower held-out Gini by at least
``min_gini_gain`` at a cross-entropy cost of at most ``max_ce_increase_pct``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from pipeline.config import CorpusConfig, RunConfig
from pipeline.data.corpus import describe_corpus, sample_sequences
from pipeline.errors import LprError
from pipeline.evaluation.heldout import heldout_sequences, measure
from pipeline.moe.loading import find_routers, load_model, load_tokenizer, resolve_model_path
from pipeline.progress import info
from pipeline.router.install import install_routers, swap_modules
from pipeline.router.load import distilled_routers
from pipeline.router.native_balance import calibrator_for
from pipeline.stages.export import run_export
from pipeline.stages.export_checkpoint import STAGE as CHECKPOINT_STAGE
from pipeline.stages.export_checkpoint import run_export_checkpoint
from pipeline.stages.protocol import build_manifest, check_states_model
from storage.routers_store import read_layer_router, write_layer_router
from storage.rundir import Manifest, RunDir
from storage.versions import (
    commit_version,
    next_version,
    partial_version_path,
    served_version,
    set_current,
    version_path,
)

STAGE = "recalibrate"


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """What the before/after table compares: mean and per-layer slot Gini and min/max, CE."""
    slot = result["mean"]["slot"]
    return {
        "gini": slot["gini"],
        "min_max": slot["min_max"],
        "floor": slot["document_interval"]["noise_gini"],
        "documents": slot["document_interval"]["documents"],
        "cross_entropy": result["cross_entropy"],
        "layers": {
            row["layer"]: {"gini": row["slot"]["gini"], "min_max": row["slot"]["min_max"]} for row in result["layers"]
        },
    }


def is_better(before: dict[str, Any], after: dict[str, Any], cfg: RunConfig) -> tuple[bool, str]:
    """Whether the new version is better on the held-out traffic, and why (one sentence)."""
    r = cfg.recalibrate
    gain = before["gini"] - after["gini"]
    cost = (after["cross_entropy"] / before["cross_entropy"] - 1) * 100
    if gain < r.min_gini_gain:
        return False, f"held-out Gini {before['gini']:.3f} → {after['gini']:.3f}: less than {r.min_gini_gain:g} lower"
    if cost > r.max_ce_increase_pct:
        return False, f"held-out CE {cost:+.2f} %: more than the {r.max_ce_increase_pct:g} % allowed"
    return True, f"held-out Gini {before['gini']:.3f} → {after['gini']:.3f} at {cost:+.2f} % CE"


def traffic_sequences(cfg: RunConfig, traffic: CorpusConfig, tokenizer: Any) -> torch.Tensor:
    """Training-side traffic sequences (n, seq_len) int64 for the calibration; an error when too few."""
    r = cfg.recalibrate
    try:
        (ids,) = sample_sequences(
            traffic, tokenizer, counts=(r.sequences,), minimum=r.min_sequences, seed=cfg.seed + 3000
        )
    except LprError as err:
        raise LprError(
            f"traffic {traffic.source} is too small to calibrate on: {err.message}",
            f"add traffic, or lower recalibrate.min_sequences (now {r.min_sequences}) or corpus.seq_len",
        ) from None
    return torch.from_numpy(ids)


def run_recalibrate(*, cfg: RunConfig, run: RunDir, traffic: CorpusConfig) -> Manifest:
    """Write the next routers version, calibrated on ``traffic``; publish it when ``recalibrate.publish``
    allows. Returns the recalibrate manifest (stats: before/after, version, published)."""
    started = time.time()
    if not run.is_complete("distill"):
        raise LprError(f"run directory {run.url} has no distilled routers", "run `lpr-distill distill RUN_DIR` first")
    check_states_model(cfg, run)
    corpus = describe_corpus(traffic)  # no text, no training side: one-line errors before any model work
    parent = served_version(run)
    routers, _ = distilled_routers(run, parent)
    form = run.read_manifest("distill").config.get("router", {}).get("form", "lpr")  # as they were distilled
    model_path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg.model, model_path)
    ids = traffic_sequences(cfg, traffic, tokenizer)  # too little traffic: an error before the model loads
    held = heldout_sequences(cfg, tokenizer, cfg.recalibrate.heldout_sequences, corpus=traffic)
    model, _ = load_model(cfg.model, model_path)
    originals = {site.name: site.module for site in find_routers(model)}
    install_routers(model, routers)
    try:
        info(f"[bold]recalibrate[/]: version {parent} on {len(held.ids)} held-out traffic sequences")
        before = _figures(measure(model, held, cfg=cfg, teachers=originals))
        calibration = calibrator_for(form, model)(model, ids, batch=cfg.distill.model_batch_sequences)
        after = _figures(measure(model, held, cfg=cfg, teachers=originals))
    finally:
        swap_modules(model, originals)
    better, why = is_better(before, after, cfg)
    publish = cfg.recalibrate.publish == "always" or (cfg.recalibrate.publish == "better" and better)
    number = write_version(run, cfg, routers, parent=parent, calibration=calibration)
    record = {
        "parent": parent,
        "traffic": traffic.source,
        "traffic_digest": corpus.digest,
        "traffic_documents": corpus.documents,
        "calibration_sequences": len(ids),
        "before": before,
        "after": after,
        "better": better,
        "judgement": why,
        "published": publish,
        "distill": run.read_manifest("distill").fingerprint,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    commit_version(run, number, record)
    checkpoint = None
    if publish:
        set_current(run, number)
        exported = run.read_manifest("export")
        out = exported.outputs["directory"] if exported is not None else run.path("lpr")
        if run.is_local or exported is not None:
            run_export(cfg=cfg, run=run, out=out)
        checkpoint = refresh_checkpoint(cfg, run, number)
    manifest = build_manifest(
        stage=STAGE,
        config={"recalibrate": cfg.recalibrate.model_dump(mode="json"), "corpus": traffic.model_dump(mode="json")},
        inputs={"distill": record["distill"], "traffic": corpus.digest, "parent": parent},
        outputs={"version": number, "directory": version_path(run, number), "published": publish}
        | ({"checkpoint": checkpoint} if checkpoint else {}),
        stats={
            "version": number,
            "parent": parent,
            "before": before,
            "after": after,
            "better": better,
            "judgement": why,
            "published": publish,
        },
        started=started,
    )
    run.write_text(run.manifest_path(STAGE), manifest.model_dump_json(indent=2))
    verdict = "published" if publish else "kept, not published"
    info(f"[bold]recalibrate[/]: version {number} ({verdict}): {why}")
    if checkpoint:
        info(f"[bold]recalibrate[/]: the drop-in checkpoint of version {number} → {checkpoint}")
    return manifest


def write_version(run: RunDir, cfg: RunConfig, routers: dict, *, parent: int, calibration: dict) -> int:
    """The routers with their recalibrated biases as the next version's layer files (partial; committed by
    ``commit_version``). Layer metadata is the parent's, with the calibration's figures added."""
    number = next_version(run)
    partial = partial_version_path(run, number)
    if run.fs.exists(partial):
        run.fs.rm(partial, recursive=True)
    source = version_path(run, parent)
    by_module = {}
    for layer in run.read_manifest("distill").outputs["layers"]:
        _, meta = read_layer_router(run, source, layer)
        by_module[meta["module"]] = (layer, meta)
    for module, router in routers.items():
        layer, meta = by_module[module]
        meta = meta | {"summary": meta["summary"] | {"recalibration": calibration.get(module, {})}}
        write_layer_router(run, partial, layer, router.state_dict(), meta)
    return number


def refresh_checkpoint(cfg: RunConfig, run: RunDir, number: int) -> str | None:
    """Where the run shipped a drop-in checkpoint (``export --checkpoint``), the published version as a new
    one beside it, ``<that directory>-vNNN`` (the shipped one stays as it is: engines may be serving it).
    Returns the new directory, or None when no checkpoint was exported."""
    shipped = run.read_manifest(CHECKPOINT_STAGE)
    if shipped is None:
        return None
    base = re.sub(r"-v\d{3}$", "", str(shipped.outputs["directory"]))  # a version this function wrote: its base
    return run_export_checkpoint(cfg=cfg, run=run, out=f"{base}-v{number:03d}")["directory"]
