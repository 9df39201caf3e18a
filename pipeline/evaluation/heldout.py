"""Held-out measurement of a model as it is routed now: loss, and per-layer expert load.

Held-out sequences are packed from the corpus's held-out documents (split by a hash of the
document name: never dumped, clustered, distilled or calibrated on). One pass over them records,
at every MoE router, the top-k slots and routing-weight mass per expert in each batch, and the
original gate's top-k on the same router input (the teacher, for top-k agreement).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.config import CorpusConfig, RunConfig
from pipeline.data.corpus import iter_documents, iter_packed, split_documents
from pipeline.errors import LprError
from pipeline.evaluation.metrics import average_layers, document_interval, layer_metrics, topk_agreement
from pipeline.moe.loading import find_routers


class HeldOut(NamedTuple):
    """Held-out sequences: ``ids`` (n, L) int64 and the corpus index of each token's ``documents`` (n, L)."""

    ids: torch.Tensor
    documents: np.ndarray


def heldout_sequences(cfg: RunConfig, tokenizer: Any, sequences: int, corpus: CorpusConfig | None = None) -> HeldOut:
    """The first ``sequences`` full packed sequences of the held-out documents of ``corpus`` (default:
    the run's corpus; a traffic slice or sample is split by the same document hash)."""
    corpus = corpus or cfg.corpus
    docs = split_documents(iter_documents(corpus), split="heldout", heldout_fraction=corpus.heldout_fraction)
    full = []
    for seq in iter_packed(docs, tokenizer=tokenizer, seq_len=corpus.seq_len, max_tokens=None):
        if len(seq.ids) == corpus.seq_len:
            full.append(seq)
        if len(full) == sequences:
            break
    if not full:
        raise LprError(
            f"the held-out documents of {corpus.source} give no sequence of {corpus.seq_len} tokens",
            "raise corpus.heldout_fraction or lower corpus.seq_len",
        )
    return HeldOut(torch.from_numpy(np.stack([s.ids for s in full])).long(), np.stack([s.doc_ids for s in full]))


class _Recorder:
    """Forward hooks on every router: slots and weight mass per expert per batch, slots per expert per
    document, teacher agreement. ``batch_documents``: (T,) 0..documents−1, each token of the batch running now."""

    def __init__(self, model: nn.Module, teachers: dict[str, nn.Module], documents: int) -> None:
        self.sites = find_routers(model)
        self.experts = self.sites[0].module.num_experts
        self.documents = documents
        self.batch_documents = np.zeros(0, np.int64)
        self.doc_slots = {s.name: np.zeros((documents, self.experts), np.int64) for s in self.sites}
        self.slots: dict[str, list[np.ndarray]] = {s.name: [] for s in self.sites}
        self.soft: dict[str, list[np.ndarray]] = {s.name: [] for s in self.sites}
        self.agree: dict[str, list[float]] = {s.name: [] for s in self.sites}
        self.teachers = teachers
        self.handles = [s.module.register_forward_hook(self._hook(s.name, s.module)) for s in self.sites]

    def _hook(self, name: str, module: nn.Module) -> Callable:
        teacher = self.teachers.get(name)

        def record(_module: nn.Module, args: tuple, output: tuple) -> None:
            _, weights, indices = output
            idx = indices.reshape(-1, indices.shape[-1]).cpu().numpy()
            w = weights.reshape(-1, weights.shape[-1]).float().cpu().numpy()
            self.slots[name].append(np.bincount(idx.reshape(-1), minlength=self.experts))
            self.soft[name].append(np.bincount(idx.reshape(-1), weights=w.reshape(-1), minlength=self.experts))
            cells = self.batch_documents.repeat(idx.shape[1]) * self.experts + idx.reshape(-1)
            self.doc_slots[name] += np.bincount(cells, minlength=self.doc_slots[name].size).reshape(self.documents, -1)
            if teacher is None or teacher is module:
                self.agree[name].append(1.0)
                return
            teacher_idx = teacher(args[0])[2].reshape(idx.shape).cpu().numpy()
            self.agree[name].append(topk_agreement(idx, teacher_idx))

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(
    model: nn.Module, held: HeldOut, *, cfg: RunConfig, teachers: dict[str, nn.Module] | None = None
) -> dict[str, Any]:
    """Held-out CE / perplexity and every load figure per layer and averaged over layers, with the
    layer-mean slot Gini's and min/max's document-bootstrap interval (``mean.slot.document_interval``).

    held: the held-out sequences, run in batches of ``validate.batch_size``. teachers: the original
    router modules by name (top-k agreement is measured against them; 1.0 where absent).
    """
    v = cfg.validate
    started = time.time()
    ids = held.ids
    names, documents = np.unique(held.documents, return_inverse=True)
    documents = documents.reshape(held.documents.shape)
    recorder = _Recorder(model, teachers or {}, len(names))
    device = next(model.parameters()).device
    loss_sum, token_count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(ids), v.batch_size):
                batch = ids[start : start + v.batch_size].to(device)
                recorder.batch_documents = documents[start : start + v.batch_size].reshape(-1)
                tokens = batch.numel() - batch.shape[0]  # next-token targets
                loss_sum += float(model(batch, labels=batch, use_cache=False).loss) * tokens
                token_count += tokens
    finally:
        recorder.close()
    layers = []
    for site in recorder.sites:
        figures = layer_metrics(
            np.stack(recorder.slots[site.name]),
            np.stack(recorder.soft[site.name]),
            capacity_factors=tuple(v.capacity_factors),
            devices=tuple(v.devices),
            idle_fraction=v.idle_fraction,
        )
        figures["topk_agreement"] = float(np.mean(recorder.agree[site.name]))
        layers.append({"layer": site.name, **figures})
    ce = loss_sum / max(1, token_count)
    mean = average_layers([{k: val for k, val in layer.items() if k != "layer"} for layer in layers])
    mean["slot"]["document_interval"] = document_interval(list(recorder.doc_slots.values())) | {"documents": len(names)}
    return {
        "cross_entropy": ce,
        "perplexity": math.exp(ce),
        "tokens": int(ids.numel()),
        "mean": mean,
        "layers": layers,
        "seconds": round(time.time() - started, 2),
    }
