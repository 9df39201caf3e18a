"""Gate-level distillation: train one layer's LPR router on the stored states to imitate the teacher
while spreading tokens evenly.

Mini-batches of rows come from a shuffled buffer of random chunks (memory bounded by the buffer, not
the layer); target = (1 − balance) · teacher distribution + balance · its Sinkhorn projection onto
the balanced set; loss = cross-entropy of the router's distribution against that target, plus an
optional prototype-diversity term. AdamW with a cosine schedule; the best step on held-out chunks
(never trained on) is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.evaluation.metrics import expert_load, gini
from pipeline.progress import progress_bar
from pipeline.router.lpr import LatentPrototypeRouter
from pipeline.training.objectives import diversity_penalty, teacher_target, warmup_cosine
from storage.states import StatesReader


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
