"""Gate-level distillation: train each layer's LPR router on the stored states to imitate the teacher
while spreading tokens evenly.

Per layer, from the LPR-init router (PCA encoder, matched centroids, temperature matched to the
teacher): mini-batches of rows drawn from a shuffled buffer of random chunks (memory bounded by
the buffer, not the layer); target = (1 − balance) · teacher distribution + balance · the teacher
distribution projected onto the balanced set (Sinkhorn over the batch with uniform expert
marginals — the closest balanced routing to the teacher); loss = cross-entropy of the router's
distribution against that target, plus an optional prototype-diversity term. AdamW with a cosine
schedule; the best step on held-out chunks (never trained on) is kept. Finally the choice bias is
calibrated on calibration rows so that top-k slot counts are equal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.init_routers import calibrate_bias, initial_router, row_logits
from pipeline.metrics import expert_load, gini
from pipeline.models import load_config, load_model, resolve_model_path
from pipeline.progress import info, progress_bar
from pipeline.replace import gate_routers, install_routers
from pipeline.router import LatentPrototypeRouter, RouterSpec
from pipeline.stages import FROM_GATES, build_manifest, check_states_model, previous_run
from storage.layer_files import read_layer_meta
from storage.routers_store import read_layer_router, write_layer_router
from storage.rundir import Manifest, RunDir, fingerprint
from storage.states import StatesReader

STAGE = "distill"


def sinkhorn_balance(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """probs (..., B, E), rows summing to 1 → the nearest (in KL) matrices with rows summing to 1 and
    every column summing to B/E: the routing with every expert equally loaded (per leading index)."""
    p = probs.clamp_min(1e-12)
    column_target = p.shape[-2] / p.shape[-1]
    for _ in range(iterations):
        p = p * (column_target / p.sum(-2, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
    return p


def split_chunks(num_rows: int, chunk_rows: int, heldout_share: float, seed: int) -> tuple[list, list]:
    """Chunk ranges for training and for held-out validation (whole chunks, so documents stay apart;
    a store of a single chunk is split by rows, its last ``heldout_share`` held out)."""
    starts = list(range(0, num_rows, chunk_rows))
    if len(starts) < 2:
        cut = max(1, min(num_rows - 1, round(num_rows * (1 - heldout_share))))
        return [(0, cut)], [(cut, num_rows)]
    order = np.random.default_rng(seed).permutation(len(starts))
    n_val = max(1, round(len(starts) * heldout_share))
    ranges = [(start, min(start + chunk_rows, num_rows)) for start in starts]
    return sorted(ranges[i] for i in order[n_val:]), sorted(ranges[i] for i in order[:n_val])


def shuffled_batches(
    reader: StatesReader, layer: str, ranges: list[tuple[int, int]], *, batch_rows: int, buffer_rows: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x (B, H) float32, teacher logits (B, E) float32) batches, rows shuffled within a
    buffer of ``buffer_rows`` rows read from randomly chosen chunks (so a batch mixes documents)."""
    rng = np.random.default_rng(seed)
    per_buffer = max(1, buffer_rows // max(1, ranges[0][1] - ranges[0][0]))
    while True:
        order = rng.permutation(len(ranges))
        for first in range(0, len(order), per_buffer):
            picked = sorted(ranges[i] for i in order[first : first + per_buffer])
            x = torch.cat([reader.read_x(layer, a, b).float() for a, b in picked])
            logits = torch.from_numpy(np.concatenate([reader.read("logits", a, b, layer=layer) for a, b in picked]))
            shuffle = torch.from_numpy(rng.permutation(len(x)))
            for start in range(0, max(1, len(x) - batch_rows + 1), batch_rows):
                index = shuffle[start : start + batch_rows]
                yield x[index], logits[index]


def validation_loss(router: LatentPrototypeRouter, x: torch.Tensor, teacher: torch.Tensor, balance: float) -> dict:
    with torch.no_grad():
        target = teacher_target(teacher, balance)
        logits = router.scores(x)
        loss = float(-(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean())
        _, indices = router.route(logits)
        load = expert_load(indices.numpy(), router.num_experts)
        teacher_top = teacher.topk(router.top_k, -1).indices
        agreement = float((indices[:, :, None] == teacher_top[:, None, :]).any(-1).float().mean())
    return {"loss": loss, "gini": gini(load), "topk_agreement": agreement}


def teacher_target(teacher_logits: torch.Tensor, balance: float, iterations: int = 30) -> torch.Tensor:
    probs = torch.softmax(teacher_logits, dim=-1)
    if balance <= 0:
        return probs
    return (1 - balance) * probs + balance * sinkhorn_balance(probs, iterations)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, steps: int, warmup_share: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_share`` of the steps (at least one), then cosine decay to 0; any
    ``steps`` ≥ 1 (one-cycle schedulers fail on very short runs)."""
    warmup = max(1, round(warmup_share * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup + 1) / (steps - warmup + 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def diversity_penalty(prototypes: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of the prototypes (E, d): 0 when orthogonal."""
    unit = F.normalize(prototypes, dim=-1)
    gram = unit @ unit.T
    off = gram - torch.diag(torch.diagonal(gram))
    return off.square().sum() / max(1, prototypes.shape[0] * (prototypes.shape[0] - 1))


def distill_layer(
    router: LatentPrototypeRouter, batches: Iterator, val: tuple[torch.Tensor, torch.Tensor], cfg: RunConfig, label: str
) -> dict[str, Any]:
    """Train ``router`` in place; keep the parameters of the best held-out step. Returns stats."""
    d = cfg.distill
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=d.lr, weight_decay=d.weight_decay)
    schedule = warmup_cosine(optimizer, d.steps, warmup_share=0.05)
    best = {"step": 0, **validation_loss(router, *val, d.balance)}
    best_state = {k: v.clone() for k, v in router.state_dict().items()}
    history = [best | {"step": 0}]
    router.train()
    with progress_bar(f"distill {label}", d.steps) as bar:
        for step in range(1, d.steps + 1):
            x, teacher = next(batches)
            target = teacher_target(teacher, d.balance, d.sinkhorn_iterations)
            log_student = F.log_softmax(router.scores(x).float(), dim=-1)
            loss = -(target * log_student).sum(-1).mean()
            if d.diversity > 0:
                loss = loss + d.diversity * diversity_penalty(router.prototypes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % d.eval_every == 0 or step == d.steps:
                current = validation_loss(router, *val, d.balance)
                history.append(current | {"step": step})
                if current["loss"] < best["loss"]:
                    best = current | {"step": step}
                    best_state = {k: v.clone() for k, v in router.state_dict().items()}
                bar.advance(
                    d.eval_every if step % d.eval_every == 0 else step % d.eval_every,
                    note=f"val {current['loss']:.4f} gini {current['gini']:.3f}",
                )
    router.load_state_dict(best_state)
    router.eval()
    return {"best": best, "history": history}


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
    val_x = torch.cat([reader.read_x(layer, a, b).float() for a, b in val_ranges])[: cfg.distill.val_rows]
    val_t = torch.from_numpy(np.concatenate([reader.read("logits", a, b, layer=layer) for a, b in val_ranges]))
    val_t = val_t[: cfg.distill.val_rows]
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
    from pipeline.calibrate import calibrate_in_model, training_sequences
    from pipeline.model_distill import distill_in_model

    d = cfg.distill
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    routers, metas = starting_routers(cfg, run, model, modules)
    sequences = training_sequences(cfg, tokenizer)
    calibration, val, train = sequences.calibration, sequences.val, sequences.train
    stats: dict[str, Any] = {"steps": d.model_steps, "train_sequences": len(train), "seq_len": cfg.corpus.seq_len}
    if d.model_steps > 0:
        result = distill_in_model(model, routers, train, val, d, seed=cfg.seed, calibration=calibration)
        stats |= {key: result[key] for key in ("best", "seconds", "tokens_per_second")}
        stats["history"] = result["history"]
        best = result["best"]
        info(
            f"[bold]distill[/] in the model: best step {best['step']}, val KL {best['kl']:.4f}, gini {best['gini']:.3f}"
        )
    install_routers(model, routers)
    calibration_stats = calibrate_in_model(model, calibration, batch=d.model_batch_sequences)
    stats["calibration_tokens"] = int(calibration.numel())
    for name, router in routers.items():
        meta = metas[name] | {
            "fingerprint": fp,
            "summary": metas[name]["summary"]
            | {"model_calibration_slots": [calibration_stats[name]["slots_min"], calibration_stats[name]["slots_max"]]},
        }
        write_layer_router(run, run.partial_path(STAGE), meta["layer"], router.state_dict(), meta)
    return {key: value for key, value in stats.items() if key != "history"} | {"history": stats.get("history", [])}
