"""Model-level distillation: the whole model with its LPR routers in place, every parameter frozen
except the routers, trained to match the original model's next-token distribution under a balance
term.

Gate-level imitation treats layers independently and every re-routed token as equally costly; here
the fidelity term is the KL from the original model's next-token distribution to the model with LPR
routers, so the routers learn which re-routings the model can afford, layer interactions included.
Balance: at every router, the cross-entropy of its distribution against that distribution projected
onto the balanced set (Sinkhorn with uniform expert marginals) **within each sequence** — routing
follows the document, and a router balanced within every sequence stays balanced on documents it
never saw (measured on the demo: held-out Gini 0.032 with per-sequence balance vs 0.043 per batch).
One model in memory: the teacher's logits come from the same model with its original routers
swapped back in for one forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DistillConfig
from pipeline.evaluation.metrics import gini
from pipeline.moe.capture import as_triple
from pipeline.moe.loading import find_routers
from pipeline.progress import progress_bar
from pipeline.router.calibrate import calibrate_in_model
from pipeline.router.install import install_routers, swap_modules
from pipeline.router.lpr import LatentPrototypeRouter
from pipeline.training.objectives import sinkhorn_balance, warmup_cosine

Calibrator = Callable[..., dict[str, dict[str, Any]]]  # (model, ids (n, S), *, batch, quiet) → figures per router


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of the next token, (B, S, V), computed once for every fidelity term."""
    return F.log_softmax(logits.float(), dim=-1)


def next_token_kl(log_teacher: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions; log-probabilities (B, S, V)."""
    vocab = log_student.shape[-1]
    student, teacher = log_student.reshape(-1, vocab), log_teacher.reshape(-1, vocab)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def next_token_gap(log_teacher: torch.Tensor, log_student: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's cross-entropy on the text's next tokens minus the teacher's (nats).

    log-probabilities (B, S, V), ids (B, S)."""
    targets = ids[:, 1:, None]
    return (log_teacher[:, :-1].gather(-1, targets) - log_student[:, :-1].gather(-1, targets)).mean()


def sequence_balance_loss(router_logits: torch.Tensor, sequences: int, iterations: int) -> torch.Tensor:
    """Cross-entropy of the router's distribution against its per-sequence balanced projection, minus
    that projection's entropy (= KL, 0 when every sequence is already balanced). router_logits (B·S, E)."""
    log_probs = F.log_softmax(router_logits.float(), dim=-1).reshape(sequences, -1, router_logits.shape[-1])
    target = sinkhorn_balance(log_probs.detach().exp(), iterations)
    return (target * (target.clamp_min(1e-12).log() - log_probs)).sum(-1).mean()


def with_candidates(
    router: LatentPrototypeRouter, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, extra: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's output with ``extra`` more experts per token (the next-best by the same choice
    rule) whose weights are zero in value but carry the gradient of their probability (straight
    through): the model's output is unchanged, and the loss now tells the router, for each runner-up
    expert, how much routing more of the token to it would help — the signal a top-k choice alone
    does not give. logits (T, E), weights / indices (T, k) → weights / indices (T, k + extra)."""
    scores = router.choice_scores(logits)  # what the family ranks experts by (probabilities, sigmoid, logits)
    ranked = torch.topk(scores.detach() + router.bias.float(), indices.shape[1] + extra, dim=-1).indices
    runners_up = ranked[:, indices.shape[1] :]
    scale = scores.detach().gather(-1, indices).sum(-1, keepdim=True) if router.spec.renormalize else 1.0
    extra_scores = scores.gather(-1, runners_up)
    straight_through = (extra_scores - extra_scores.detach()) / scale
    return logits, torch.cat([weights, straight_through.to(weights.dtype)], -1), torch.cat([indices, runners_up], -1)


class RouterTaps:
    """Forward hooks that keep each router's latest logits (T, E) and indices (T, k), gradient intact;
    with ``candidates`` > 0 and gradients on, each router also hands the experts that many runner-up
    experts with straight-through zero weights (see ``with_candidates``)."""

    def __init__(self, routers: dict[str, LatentPrototypeRouter], candidates: int = 0) -> None:
        self.logits: dict[str, torch.Tensor] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.candidates = candidates
        self._handles = [router.register_forward_hook(self._hook(name)) for name, router in routers.items()]

    def _hook(self, name: str) -> Callable:
        def keep(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
            logits, weights, indices = as_triple(output, module.top_k)
            self.logits[name], self.indices[name] = logits, indices
            if self.candidates > 0 and torch.is_grad_enabled() and len(output) == 3:  # not Llama 4's dense scores
                return with_candidates(module, logits, weights, indices, self.candidates)
            return None

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _losses(
    model: nn.Module,
    originals: dict[str, nn.Module],
    routers: dict[str, LatentPrototypeRouter],
    taps: RouterTaps,
    ids: torch.Tensor,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fidelity, mean per-layer balance loss) on the sequences ids (B, S). Fidelity: the KL to the
    original model, or with ``model_data_ce`` > 0 that share of it replaced by the gap in the text's
    own next-token loss (student − teacher)."""
    swap_modules(model, originals)
    with torch.no_grad():
        log_teacher = next_token_log_probs(model(ids, use_cache=False).logits)
    swap_modules(model, routers)
    log_student = next_token_log_probs(model(ids, use_cache=False).logits)
    balance = sum(sequence_balance_loss(taps.logits[name], len(ids), cfg.sinkhorn_iterations) for name in routers)
    fidelity = next_token_kl(log_teacher, log_student)
    if cfg.model_data_ce > 0:
        gap = next_token_gap(log_teacher, log_student, ids)
        fidelity = (1 - cfg.model_data_ce) * fidelity + cfg.model_data_ce * gap
    return fidelity, balance / len(routers)


def _evaluate(model, originals, routers, taps, ids: torch.Tensor, cfg: DistillConfig, batch: int) -> dict[str, float]:
    fidelity, balance, loads = 0.0, 0.0, {name: np.zeros(r.num_experts) for name, r in routers.items()}
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            f, b = _losses(model, originals, routers, taps, chunk, cfg)
            fidelity, balance = fidelity + float(f) * len(chunk), balance + float(b) * len(chunk)
            for name in routers:
                loads[name] += np.bincount(taps.indices[name].reshape(-1).cpu().numpy(), minlength=len(loads[name]))
    fidelity, balance = fidelity / len(ids), balance / len(ids)
    return {  # "kl" is the fidelity term: the KL itself unless distill.model_data_ce > 0
        "kl": fidelity,
        "balance": balance,
        "objective": (1 - cfg.balance) * fidelity + cfg.balance * balance,
        "gini": float(np.mean([gini(load) for load in loads.values()])),
    }


def distill_in_model(
    model: nn.Module,
    routers: dict[str, LatentPrototypeRouter],
    train: torch.Tensor,
    val: torch.Tensor,
    cfg: DistillConfig,
    seed: int,
    calibration: torch.Tensor | None = None,
    *,
    fixed: Collection[str] = (),
    calibrator: Calibrator = calibrate_in_model,
) -> dict[str, Any]:
    """Train ``routers`` (keyed by router module name) in place inside ``model`` on the sequences
    train (n, S), batch after batch, each seen once when n ≥ model_steps · model_batch_sequences;
    keep the parameters of the best step on val (m, S) by (1 − balance) · KL + balance · balance loss. With
    ``calibration`` sequences (c, S) and ``model_calibrate_every`` > 0, the choice bias is calibrated in the
    model on them before the first step and every that many steps, so the routers learn under the balanced
    routing they will serve with, by ``calibrator`` (``calibrate_in_model``: the choice bias). ``fixed``: names
    of router parameters that stay fixed (a native distillation trains only the family's own tensors).
    ``model`` holds its original routers on entry and on return."""
    originals = {site.name: site.module for site in find_routers(model)}
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    for router in routers.values():
        router.bias.zero_()
    install_routers(model, routers)
    every = cfg.model_calibrate_every if calibration is not None else 0

    def calibrate() -> None:
        calibrator(model, calibration[: cfg.model_calibration_sequences], batch=cfg.model_batch_sequences, quiet=True)

    params = []
    for router in routers.values():
        for name, parameter in router.named_parameters():
            parameter.requires_grad_(name not in fixed)
            params += [parameter] if name not in fixed else []
    taps = RouterTaps(routers, cfg.model_candidates)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.model_lr, weight_decay=cfg.weight_decay)
    steps = cfg.model_steps
    schedule = warmup_cosine(optimizer, steps, warmup_share=0.1)
    batch = cfg.model_batch_sequences
    started = time.time()
    try:
        if every:
            calibrate()
        best = {"step": 0, **_evaluate(model, originals, routers, taps, val.to(device), cfg, batch)}
        best_state = {name: {k: v.clone() for k, v in r.state_dict().items()} for name, r in routers.items()}
        history = [dict(best)]
        with progress_bar("distill in the model", steps) as bar:
            for step in range(1, steps + 1):
                start = (step - 1) * batch  # every sequence once, then again (a small corpus) in the same order
                ids = train[torch.arange(start, start + batch) % len(train)].to(device)
                fidelity, balance = _losses(model, originals, routers, taps, ids, cfg)
                loss = (1 - cfg.balance) * fidelity + cfg.balance * balance
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if every and step % every == 0 and step < steps:
                    calibrate()
                note = f"KL {fidelity.item():.4f} balance {balance.item():.4f}"
                if step % cfg.model_eval_every == 0 or step == steps:
                    current = {"step": step, **_evaluate(model, originals, routers, taps, val.to(device), cfg, batch)}
                    history.append(current)
                    if current["objective"] < best["objective"]:
                        best = current
                        best_state = {n: {k: v.clone() for k, v in r.state_dict().items()} for n, r in routers.items()}
                    note += f" | val KL {current['kl']:.4f} gini {current['gini']:.3f}"
                bar.advance(1, note=note)
    finally:
        taps.remove()
        swap_modules(model, originals)
        for parameter in params:
            parameter.requires_grad_(False)
        for parameter in frozen:
            parameter.requires_grad_(True)
    for name, router in routers.items():
        router.load_state_dict(best_state[name])
        router.eval()
    seconds = time.time() - started
    return {
        "best": best,
        "history": history,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(steps * batch * train.shape[1] / max(seconds, 1e-9), 1),
    }
