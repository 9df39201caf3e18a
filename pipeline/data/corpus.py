"""Text sources → documents → a held-out split by document → packed token sequences.

Sources: plain text files or folders (one document per file), JSONL and Parquet (one document
per row, text in a named field), a ``datasets`` dataset saved with ``save_to_disk`` or named on
the hub as ``hf:NAME``, and the built-in demo corpus (``demo``). Local paths and fsspec URLs
are read through the same code.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import fsspec
import numpy as np

from pipeline.data.documents import Document, PackedSequence, is_heldout, split_documents
from pipeline.data.readers import FolderScan, read_dataset, read_jsonl, read_parquet, read_text
from pipeline.errors import LprError

if TYPE_CHECKING:
    from pipeline.config import CorpusConfig


def _existing(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise LprError(f"corpus {source} does not exist", "pass an existing file, folder or URL as --corpus")
    return fs, path


def detect_format(source: str) -> str:
    """The corpus format implied by a source string (``corpus.format: auto``)."""
    if source == "demo" or source.startswith("demo:"):
        return "demo"
    if source.startswith("hf:"):
        return "datasets"
    fs, path = _existing(source)
    if fs.isdir(path):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        return "datasets" if {"dataset_info.json", "state.json", "dataset_dict.json"} & names else "text"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
        if path.endswith(suffix):
            return fmt
    return "text"


def iter_documents(cfg: CorpusConfig, scan: FolderScan | None = None) -> Iterator[tuple[int, Document]]:
    """``(corpus index, document)`` for every non-empty document of the source, streamed in a stable order.

    Streaming keeps memory flat for corpora larger than RAM; ``describe_corpus`` makes one full
    pass first to check the corpus and hash it. ``scan`` collects what a folder corpus skipped.
    """
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt == "demo":
        from pipeline.demo.corpus import KINDS, demo_documents

        kind = cfg.source.removeprefix("demo:") if cfg.source.startswith("demo:") else None
        if kind is not None and kind not in KINDS:
            raise LprError(
                f"corpus {cfg.source}: the demo has no documents of kind '{kind}'",
                f"use one of demo:{', demo:'.join(KINDS)}",
            )
        docs: Iterable[Document] = demo_documents(max_chars=cfg.demo_max_chars, kind=kind)
    elif fmt == "datasets":
        docs = read_dataset(cfg.source, cfg.text_field)
    else:
        fs, path = _existing(cfg.source)
        readers = {"text": read_text, "jsonl": read_jsonl, "parquet": read_parquet}
        if fmt == "text":
            suffixes = frozenset(s.lower() for s in cfg.suffixes) if cfg.suffixes is not None else None
            include = frozenset(cfg.include) if cfg.include is not None else None
            docs = read_text(fs, path, field=cfg.text_field, suffixes=suffixes, include=include, scan=scan)
        else:
            docs = readers[fmt](fs, path, cfg.text_field)
    yield from enumerate(d for d in docs if d.text.strip())


@dataclass(frozen=True)
class CorpusSummary:
    digest: str  # hash of every document's index, name and text
    documents: int
    train_documents: int
    heldout_documents: int


def describe_corpus(cfg: CorpusConfig) -> CorpusSummary:
    """One streaming pass: count and hash the documents; raise if there is no text or no train split."""
    digest = hashlib.sha256()
    counts = {True: 0, False: 0}
    scan = FolderScan()
    for index, doc in iter_documents(cfg, scan):
        digest.update(f"{index}\0{doc.name}\0".encode())
        digest.update(doc.text.encode())
        counts[is_heldout(doc.name, cfg.heldout_fraction)] += 1
    summary = CorpusSummary(digest.hexdigest()[:16], counts[True] + counts[False], counts[False], counts[True])
    if summary.documents == 0 and scan.files:
        raise LprError(
            f"corpus {cfg.source} has no text: {scan.describe()}",
            "point --corpus at text files, or set corpus.suffixes to the extensions to read "
            '(e.g. --set \'corpus.suffixes=[.py, .txt, ""]\'; "" for files without one)',
        )
    if summary.documents == 0:
        raise LprError(f"corpus {cfg.source} has no text", "point --corpus at files or rows that contain text")
    if summary.train_documents == 0:
        raise LprError(
            f"corpus {cfg.source} has no training documents after the held-out split ({summary.documents} in all)",
            "add documents or lower corpus.heldout_fraction",
        )
    return summary


def iter_packed(
    docs: Iterable[tuple[int, Document]], *, tokenizer, seq_len: int, max_tokens: int | None
) -> Iterator[PackedSequence]:
    """Pack documents, each followed by EOS, into sequences of ``seq_len`` tokens.

    The last sequence may be shorter; ``max_tokens`` truncates the stream exactly.
    """
    eos = tokenizer.eos_token_id
    budget = max_tokens if max_tokens is not None else float("inf")
    ids_buf: list[int] = []
    doc_buf: list[int] = []
    emitted = 0
    docs = iter(docs)
    while group := list(itertools.islice(docs, 64)):
        encoded = tokenizer([d.text for _, d in group], add_special_tokens=False)["input_ids"]
        for (index, _), ids in zip(group, encoded, strict=True):
            ids = list(ids) + ([eos] if eos is not None else [])
            ids_buf.extend(ids)
            doc_buf.extend([index] * len(ids))
            while len(ids_buf) >= seq_len or (ids_buf and emitted + len(ids_buf) >= budget):
                take = int(min(seq_len, budget - emitted))
                yield PackedSequence(np.asarray(ids_buf[:take], np.int64), np.asarray(doc_buf[:take], np.int64))
                emitted += take
                del ids_buf[:take], doc_buf[:take]
                if emitted >= budget:
                    return
    if ids_buf:
        yield PackedSequence(np.asarray(ids_buf, np.int64), np.asarray(doc_buf, np.int64))


def sample_sequences(
    cfg: CorpusConfig,
    tokenizer,
    *,
    counts: Sequence[int],
    minimum: int,
    seed: int,
    split: Literal["train", "heldout"] = "train",
) -> list[np.ndarray]:
    """Disjoint draws of full sequences, one (n_g, seq_len) int64 array per entry of ``counts``
    (up to that many each), at random from one side of the split, in random order; raises when the
    corpus has fewer than ``minimum`` full sequences.

    The pool is the first 4 · sum(counts) full sequences of that side (bounded work on a huge
    corpus; many documents per draw). Each pool sequence gets a seeded random key and the draws take
    the pool in key order, so where the pool is the whole side (the demo; any corpus that small) an
    earlier draw does not depend on the later counts: the calibration sequences stay the same
    whatever training budget is drawn after them.
    """
    docs = split_documents(iter_documents(cfg), split=split, heldout_fraction=cfg.heldout_fraction)
    packed = iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.seq_len, max_tokens=None)
    pool = [s.ids for s in itertools.islice(packed, 4 * sum(counts)) if len(s.ids) == cfg.seq_len]
    if len(pool) < minimum:
        raise LprError(
            f"the corpus has {len(pool)} full {split} sequences of {cfg.seq_len} tokens, at least {minimum} are needed",
            "use a larger corpus, a shorter corpus.seq_len, or fewer distill.calibration_sequences / model_* sequences",
        )
    rows = np.asarray(pool, np.int64).reshape(-1, cfg.seq_len)
    order = np.argsort(np.random.default_rng(seed).random(len(rows)), kind="stable")
    bounds = np.minimum(np.cumsum([0, *counts]), len(rows))
    return [rows[order[start:stop]] for start, stop in itertools.pairwise(bounds)]
