"""The distill stage: per layer, an LPR router from the clusters (or the model's own gate) trained on
the stored states (``training.gate_level``); then all routers in the frozen model against its
next-token distribution (``training.model_level``); finally the choice bias calibrated in the model
so that top-k slot counts are equal.

``router.form: native``: the gates' path (``router.init: gate``) with only the family's own router
tensors trained, and the balance calibrated where the family can carry it
(``pipeline.router.native_balance``), so that the stored routers fold into a drop-in checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.loading import load_config, load_model, resolve_model_path
from pipeline.progress import info
from pipeline.router.from_clusters import calibrate_bias, initial_router, row_logits
from pipeline.router.install import gate_routers, install_routers
from pipeline.router.lpr import LatentPrototypeRouter, RouterSpec
from pipeline.router.provenance import FROM_GATES
from pipeline.stages.protocol import build_manifest, check_states_model, previous_run
from pipeline.training.gate_level import distill_layer, shuffled_batches, split_chunks, validation_loss
from storage.layer_files import read_layer_meta
from storage.routers_store import read_layer_router, write_layer_router
from storage.rundir import Manifest, RunDir, fingerprint
from storage.states import StatesReader

STAGE = "distill"


def distill_identity(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(config, inputs, fingerprint) of a distill run over this run's prototypes: what the manifest and
    every layer file carry, so a flow that fans layers out passes ``distill_one`` the same fingerprint."""
    cluster = run.read_manifest("cluster")
    if cluster is None or not run.is_complete("cluster"):
        raise LprError(f"no complete prototypes in {run.url}", "run `lpr-distill cluster RUN_DIR` first")
    check_states_model(cfg, run)
    config = {"seed": cfg.seed, **cfg.section("router", "distill", "corpus")}
    inputs = {"prototypes": cluster.fingerprint}
    return config, inputs, fingerprint(config, inputs)


def finished_layer(cfg: RunConfig, run: RunDir, layer: str, fp: str) -> dict[str, Any] | None:
    """The summary of a layer's router already written in this attempt with this fingerprint (what
    ``run_distill`` reuses), or None. A flow's per-layer task checks it before ``distill_one``.
    With ``router.init: gate`` no gate-level router is ever written, so nothing is read."""
    if cfg.router.init == "gate":
        return None
    done = read_layer_meta(run, gate_path(run), layer)
    return done["summary"] if done is not None and done.get("fingerprint") == fp else None


def run_distill(*, cfg: RunConfig, run: RunDir, force: bool = False) -> Manifest:
    """Write ``routers/``: per MoE layer the gate-level router (``routers/gate/``), then the routers
    distilled in the model and calibrated there (``routers/``)."""
    config, inputs, fp = distill_identity(cfg, run)
    started = time.time()
    model_config = load_config(cfg.model, resolve_model_path(cfg))
    if (done := previous_run(run, STAGE, fp, force=force)) is not None:
        return done.model_copy(update={"skipped": True})
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    summary = {}
    for layer in reader.layers:
        if (done := finished_layer(cfg, run, layer, fp)) is not None:
            summary[layer] = done
            info(f"[bold]distill[/] {layer}: gate-level router reused (already done with this config)")
            continue
        summary[layer] = distill_one(cfg=cfg, run=run, reader=reader, layer=layer, fp=fp, model_config=model_config)
    modules = {layer: reader.layer_module(layer) for layer in reader.layers}
    model_stats = distill_model_level(cfg=cfg, run=run, modules=modules, fp=fp)
    outputs = {"routers": "routers", "layers": list(summary), "bytes": run.size_bytes(run.partial_path(STAGE))}
    stats = {"layers": summary, "model_level": model_stats}
    manifest = build_manifest(stage=STAGE, config=config, inputs=inputs, outputs=outputs, stats=stats, started=started)
    run.commit(STAGE, manifest)
    return manifest


def starting_routers(
    cfg: RunConfig, run: RunDir, model: Any, modules: dict[str, str]
) -> tuple[dict[str, LatentPrototypeRouter], dict[str, dict[str, Any]]]:
    """The routers the model-level phase starts from, and the metadata their files will carry, both
    keyed by router module name: the gate-level routers, or the model's gates (``router.init: gate``)."""
    routers, metas = {}, {}
    if cfg.router.init == "gate":
        gates = gate_routers(model)
        for layer, module in modules.items():
            routers[module] = gates[module]
            metas[module] = {"layer": layer, "module": module, "spec": gates[module].spec.to_dict()}
            metas[module] |= {"summary": dict(FROM_GATES), "history": []}
        return routers, metas
    for layer in modules:
        state, meta = read_layer_router(run, gate_path(run), layer)
        router = LatentPrototypeRouter(RouterSpec(**meta["spec"]))
        router.load_state_dict(state, strict=True)
        routers[meta["module"]], metas[meta["module"]] = router, meta
    return routers, metas


def first_rows(ranges: list[tuple[int, int]], rows: int) -> list[tuple[int, int]]:
    """The leading ``ranges`` cut to hold ``rows`` rows in all (or every row, if they hold fewer)."""
    kept = []
    for start, stop in ranges:
        if rows <= 0:
            break
        kept.append((start, min(stop, start + rows)))
        rows -= kept[-1][1] - start
    return kept


def gate_path(run: RunDir) -> str:
    """Where the gate-level routers are written while the stage runs (``routers/gate/`` once committed)."""
    return f"{run.partial_path(STAGE)}/gate"


def distill_one(*, cfg: RunConfig, run: RunDir, reader: StatesReader, layer: str, fp: str, model_config: Any) -> dict:
    """One layer, gate-level: LPR-init, distillation on the stored states, bias calibration on
    stored rows; written into ``routers.partial/gate/``. With ``router.init: gate`` there is no
    gate-level phase (the router starts as the gate itself, in the model): nothing to do here."""
    if cfg.router.init == "gate":
        return dict(FROM_GATES)
    started = time.time()
    init = initial_router(cfg=cfg, run=run, reader=reader, layer=layer, model_config=model_config)
    router, meta, calibration = init.router, init.meta, init.calibration
    seed = cfg.seed + meta["layer_index"]
    train, val_ranges = split_chunks(reader.num_rows, reader.chunk_rows, cfg.distill.heldout_share, seed)
    val_ranges = first_rows(val_ranges, cfg.distill.val_rows)  # not every held-out chunk: they grow with the dump
    val_x = torch.cat([reader.read_x(layer, a, b).float() for a, b in val_ranges])
    val_t = torch.from_numpy(np.concatenate([reader.read("logits", a, b, layer=layer) for a, b in val_ranges]))
    batches = shuffled_batches(
        reader, layer, train, batch_rows=cfg.distill.batch_rows, buffer_rows=cfg.distill.buffer_rows, seed=seed
    )
    stats = distill_layer(router, batches, (val_x, val_t), cfg, layer)
    balance = calibrate_bias(router, row_logits(router, reader, layer, calibration))
    after = validation_loss(router, val_x, val_t, cfg.distill.balance)
    summary = {
        "best_step": stats["best"]["step"],
        "val_loss": round(after["loss"], 5),
        "val_gini": round(after["gini"], 4),
        "val_topk_agreement": round(after["topk_agreement"], 4),
        "calibration_slots": [balance["slots_min"], balance["slots_max"]],
        "seconds": round(time.time() - started, 2),
    }
    meta_out = {
        "layer": layer,
        "module": meta["module"],
        "fingerprint": fp,
        "spec": router.spec.to_dict(),
        "summary": summary,
        "history": stats["history"],
    }
    write_layer_router(run, gate_path(run), layer, router.state_dict(), meta_out)
    gini_text, agreement = f"{summary['val_gini']:.3f}", f"{summary['val_topk_agreement']:.1%}"
    info(f"[bold]distill[/] {layer}: held-out gini {gini_text}, teacher top-k agreement {agreement}")
    return summary


def distill_model_level(*, cfg: RunConfig, run: RunDir, modules: dict[str, str], fp: str) -> dict[str, Any]:
    """The whole-model phase, from the gate-level routers (or, with ``router.init: gate``, from the
    model's own gates): distillation in the model (when ``distill.model_steps`` > 0), then the bias
    calibrated in the model, layer by layer, on training-side sequences. ``modules``: each stored
    layer's router module name. Writes the final routers into ``routers.partial/``."""
    from pipeline.router.calibrate import training_sequences
    from pipeline.router.native_balance import calibrator_for, frozen_parameters
    from pipeline.training.model_level import distill_in_model

    d = cfg.distill
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    routers, metas = starting_routers(cfg, run, model, modules)
    sequences = training_sequences(cfg, tokenizer)
    calibration, val, train = sequences.calibration, sequences.val, sequences.train
    stats: dict[str, Any] = {"steps": d.model_steps, "train_sequences": len(train), "seq_len": cfg.corpus.seq_len}
    calibrator = calibrator_for(cfg.router.form, model)
    fixed = ()
    if cfg.router.form == "native":  # only the family's own tensors train; balance goes where it can carry it
        fixed = frozen_parameters(FAMILIES[family_of(model.config)])
    if d.model_steps > 0:
        result = distill_in_model(
            model, routers, train, val, d, seed=cfg.seed, calibration=calibration, fixed=fixed, calibrator=calibrator
        )
        stats |= {key: result[key] for key in ("best", "seconds", "tokens_per_second")}
        stats["history"] = result["history"]
        best = result["best"]
        info(
            f"[bold]distill[/] in the model: best step {best['step']}, val KL {best['kl']:.4f}, gini {best['gini']:.3f}"
        )
    install_routers(model, routers)
    calibration_stats = calibrator(model, calibration, batch=d.model_batch_sequences)
    stats["calibration_tokens"] = int(calibration.numel())
    for name, router in routers.items():
        figures = calibration_stats[name]
        summary = {"model_calibration_slots": [figures["slots_min"], figures["slots_max"]]}
        if cfg.router.form == "native":  # where the balance went, and how it did (native_balance)
            summary |= {"form": "native"} | {k: v for k, v in figures.items() if k not in ("slots_min", "slots_max")}
        meta = metas[name] | {"fingerprint": fp, "summary": metas[name]["summary"] | summary}
        write_layer_router(run, run.partial_path(STAGE), meta["layer"], router.state_dict(), meta)
    return {key: value for key, value in stats.items() if key != "history"} | {"history": stats.get("history", [])}
