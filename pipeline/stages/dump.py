"""Dump stage: run the model over the train split and record what every router sees and decides.

A forward hook on each router records its input ``x`` and its output triple (logits, top-k
weights, top-k indices; ``pipeline.moe.capture.as_triple`` for a family that returns another
shape); padding rows are dropped before anything is stored. Batches go to a background writer
thread so the forward pass of batch i+1 overlaps the write of batch i. The store commits its
row count after each batch; a rerun with the same fingerprint resumes at the first uncommitted
packed sequence (batches are whole sequences, so the resumed run forms the same batches and
writes the same rows).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.data.corpus import (
    CorpusSummary,
    PackedSequence,
    describe_corpus,
    iter_documents,
    iter_packed,
    split_documents,
)
from pipeline.errors import LprError
from pipeline.moe.capture import RouterCapture
from pipeline.moe.families import FAMILIES
from pipeline.moe.loading import RouterSite, find_routers, load_config, load_model, model_identity, resolve_model_path
from pipeline.progress import Bar, info, progress_bar
from pipeline.stages.dump_merge import merge_shards
from pipeline.stages.protocol import build_manifest, previous_run
from storage.background import BackgroundWriter
from storage.rundir import Manifest, RunDir, fingerprint
from storage.shards import remove_all_shards, remove_tree
from storage.states import (
    StatesReader,
    StatesWriter,
    StoreLayout,
)

STAGE = "dump"


def pad_batch(seqs: list[PackedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs (B, L) and the flat mask (B·L,) of real tokens."""
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    doc = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq.ids)] = torch.from_numpy(seq.ids)
        doc[row, : len(seq.ids)] = torch.from_numpy(seq.doc_ids)
        attention[row, : len(seq.ids)] = 1
    positions = torch.arange(length).expand(len(seqs), length)
    mask = attention.reshape(-1).bool()
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "mask": mask,
        "token_id": ids.reshape(-1)[mask].numpy().astype(np.int32),
        "doc_id": doc.reshape(-1)[mask].numpy(),
        "position": positions.reshape(-1)[mask].numpy().astype(np.int32),
    }


def batched(seqs: Iterable[PackedSequence], size: int) -> Iterator[list[PackedSequence]]:
    iterator = iter(seqs)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def layout_for(sites: list[RouterSite], records: list[dict[str, torch.Tensor]], cfg: RunConfig) -> StoreLayout:
    first = records[0]
    return StoreLayout(
        layer_modules=[s.name for s in sites],
        layer_indices=[s.layer_index for s in sites],
        hidden_size=int(first["x"].shape[-1]),
        num_experts=int(first["logits"].shape[-1]),
        top_k=int(first["topk_idx"].shape[-1]),
        x_dtype=cfg.dump.dtype,
        chunk_rows=cfg.dump.chunk_rows or cfg.dump.batch_tokens,
        codec=cfg.dump.codec,
    )


def forward_base(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """The forward pass the dump needs: the decoder stack only (the LM head routes nothing)."""
    model.base_model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    )


def write_states(
    *,
    model: nn.Module,
    sites: list[RouterSite],
    batches: Iterable[list[PackedSequence]],
    pad_id: int,
    writer: StatesWriter | None,
    create_store: Callable[[list[dict[str, torch.Tensor]]], StatesWriter],
    bar: Bar,
    x_dtype: torch.dtype,
) -> tuple[StatesWriter | None, int]:
    """Forward every batch with capture hooks on, handing rows to a background writer.

    ``create_store(records)`` makes the store on the first batch when there is none to resume
    (its layout comes from what the routers returned). Returns the writer and the rows written.
    """
    device = next(model.parameters()).device
    capture = RouterCapture(sites, x_dtype)
    background = BackgroundWriter(writer) if writer is not None else None
    rows, started = 0, time.time()
    try:
        with torch.inference_mode():
            for seqs in batches:
                batch = pad_batch(seqs, pad_id)
                forward_base(model, batch, device)
                records = capture.take(batch["mask"])
                if background is None:
                    writer = create_store(records)
                    background = BackgroundWriter(writer)
                background.put({k: batch[k] for k in ("token_id", "doc_id", "position")}, records, len(seqs))
                rows += len(batch["token_id"])
                bar.advance(len(batch["token_id"]), note=f"{rows / max(time.time() - started, 1e-9):,.0f} tok/s")
    finally:
        capture.close()
        if background is not None:
            background.close()  # waits for the last write; re-raises a write error
    return writer, rows


@dataclass(frozen=True)
class DumpPlan:
    """What every dump process works out before it touches the run directory."""

    corpus: CorpusSummary
    model_path: str
    config: dict[str, Any]  # the config sections the fingerprint covers
    inputs: dict[str, Any]  # model identity, corpus digest
    fingerprint: str
    started: float


def plan_dump(cfg: RunConfig) -> DumpPlan:
    """Check the corpus and the model (bad input fails here, before anything is written) and fingerprint them."""
    corpus = describe_corpus(cfg.corpus)
    model_path = resolve_model_path(cfg)  # builds the demo model on first use (not part of the stage's time)
    started = time.time()
    load_config(cfg.model, model_path)
    config = cfg.section("model", "corpus", "dump")
    del config["dump"]["shards"]  # the store is the same row for row however many workers wrote it
    inputs = {"model": model_identity(model_path, cfg.model.revision), "corpus": corpus.digest}
    return DumpPlan(corpus, model_path, config, inputs, fingerprint(config, inputs), started)


def store_attrs(cfg: RunConfig, model: nn.Module, model_path: str) -> dict[str, Any]:
    """The root attributes of a states store that say where its rows came from."""
    return {
        "model": "demo" if cfg.model.path == "demo" else model_path,
        "model_path": model_path,
        "revision": cfg.model.revision,
        "family": model.config.model_type,
        "weight_convention": FAMILIES[model.config.model_type].weights,
        "corpus": cfg.corpus.source,
        "seq_len": cfg.corpus.seq_len,
    }


def batch_seqs(cfg: RunConfig) -> int:
    """Packed sequences per forward pass (every batch but the stream's last has exactly this many)."""
    return max(1, cfg.dump.batch_tokens // cfg.corpus.seq_len)


def train_sequences(cfg: RunConfig, tokenizer) -> Iterator[PackedSequence]:
    """The packed-sequence stream of the train split, in corpus order (the same in every process)."""
    docs = split_documents(iter_documents(cfg.corpus), split="train", heldout_fraction=cfg.corpus.heldout_fraction)
    return iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.corpus.seq_len, max_tokens=cfg.dump.max_tokens)


def run_dump(*, cfg: RunConfig, run: RunDir, force: bool = False) -> Manifest:
    """Write ``states.zarr`` for the train split of the corpus. Returns the stage's manifest.

    With ``dump.shards`` = N > 1 the rows come from the N shard stores that ``run_dump_shard``
    workers wrote (``pipeline.stages.dump_shards``): this merges them, in stream order, once all are complete.
    """
    plan = plan_dump(cfg)
    if (done := previous_run(run, STAGE, plan.fingerprint, force=force)) is not None:
        remove_all_shards(run)  # left over when a merge was stopped between its commit and this cleanup
        return done.model_copy(update={"skipped": True})
    store_url = run.url_of(run.partial_path(STAGE))
    if force:
        remove_tree(run, run.partial_path(STAGE))
    if cfg.dump.shards > 1:
        stats = merge_shards(run=run, count=cfg.dump.shards, fingerprint=plan.fingerprint, store_url=store_url)
    else:
        stats = _dump_here(cfg=cfg, run=run, plan=plan, store_url=store_url)
    reader = StatesReader(store_url, run.storage_options)
    rows = reader.num_rows
    stats = {"rows": rows, "sequences": int(reader.attrs["committed_seqs"])} | stats
    stats["documents_in_rows"] = int(np.unique(reader.read("doc_id")).size)
    outputs = {
        "states": "states.zarr",
        "layers": {name: reader.layer_module(name) for name in reader.layers},
        "rows": rows,
        "bytes": run.size_bytes(run.partial_path(STAGE)),
    }
    manifest = build_manifest(
        stage=STAGE, config=plan.config, inputs=plan.inputs, outputs=outputs, stats=stats, started=plan.started
    )
    run.commit(STAGE, manifest)
    remove_all_shards(run)  # only after the commit: until then a killed merge resumes from them
    info(f"[bold]dump[/]: {rows:,} rows × {len(reader.layers)} MoE layers → {run.url_of(run.output_path(STAGE))}")
    return manifest


@dataclass
class Streamed:
    """What one process's pass over its part of the train stream left: the writer (None when the
    stream was empty), rows written by this run, rows already there when it started, seconds."""

    writer: StatesWriter | None
    new_rows: int
    resumed_rows: int
    seconds: float


def dump_stream(
    *,
    cfg: RunConfig,
    run: RunDir,
    plan: DumpPlan,
    url: str,
    label: str,
    budget: int | None,
    extra_attrs: dict[str, Any] | None = None,
    select: Callable[[Iterator[PackedSequence]], Iterator[PackedSequence]] = lambda sequences: sequences,
) -> Streamed:
    """Load the model and append the states of ``select(train sequences)`` into the store at ``url``,
    resumed after its committed sequences (the single-process dump and each shard worker)."""
    model, tokenizer = load_model(cfg.model, plan.model_path)
    sites = find_routers(model)
    writer = StatesWriter.resume(url, fingerprint=plan.fingerprint, storage_options=run.storage_options)
    resumed_rows = writer.committed_rows if writer else 0
    if resumed_rows:
        info(f"[bold]{label}[/]: resuming at row {resumed_rows:,} (sequence {writer.committed_seqs:,})")
    attrs = store_attrs(cfg, model, plan.model_path) | (extra_attrs or {})

    def create_store(records: list[dict[str, torch.Tensor]]) -> StatesWriter:
        return StatesWriter.create(
            url,
            layout=layout_for(sites, records, cfg),
            attrs=attrs,
            fingerprint=plan.fingerprint,
            storage_options=run.storage_options,
        )

    sequences = itertools.islice(select(train_sequences(cfg, tokenizer)), writer.committed_seqs if writer else 0, None)
    started = time.time()
    with progress_bar(label, budget) as bar:
        bar.advance(resumed_rows)
        writer, new_rows = write_states(
            model=model,
            sites=sites,
            batches=batched(sequences, batch_seqs(cfg)),
            pad_id=tokenizer.pad_token_id,
            writer=writer,
            create_store=create_store,
            bar=bar,
            x_dtype=getattr(torch, cfg.dump.dtype),
        )
    return Streamed(writer, new_rows, resumed_rows, time.time() - started)


def _dump_here(*, cfg: RunConfig, run: RunDir, plan: DumpPlan, store_url: str) -> dict[str, Any]:
    """The whole stream by this process into the partial store (resumed where a killed run stopped)."""
    streamed = dump_stream(cfg=cfg, run=run, plan=plan, url=store_url, label="dump", budget=cfg.dump.max_tokens)
    if streamed.writer is None:
        raise LprError("the corpus produced no tokens to dump", "check --corpus and dump.max_tokens")
    streamed.writer.finish({"corpus_documents": plan.corpus.documents, "train_documents": plan.corpus.train_documents})
    return {
        "rows_this_run": streamed.new_rows,
        "resumed_from_row": streamed.resumed_rows,
        "loop_seconds": round(streamed.seconds, 3),
        "tokens_per_second": round(streamed.new_rows / max(streamed.seconds, 1e-9), 1),  # forward + capture + writes
    }
