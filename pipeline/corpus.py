"""Text sources → documents → a held-out split by document → packed token sequences.

Sources: plain text files or folders (one document per file), JSONL and Parquet (one document
per row, text in a named field), a ``datasets`` dataset saved with ``save_to_disk`` or named on
the hub as ``hf:NAME``, and the built-in demo corpus (``demo``). Local paths and fsspec URLs
are read through the same code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import fsspec
import numpy as np

from pipeline.errors import LprError

if TYPE_CHECKING:
    from pipeline.config import CorpusConfig

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass(frozen=True)
class Document:
    name: str  # stable, unique within the corpus (decides the held-out split)
    text: str


@dataclass(frozen=True)
class PackedSequence:
    """One model input: ``ids [L] int64`` and the corpus index of each token's document."""

    ids: np.ndarray
    doc_ids: np.ndarray


def is_heldout(name: str, fraction: float) -> bool:
    """Deterministic split by document name: the same document is always on the same side."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32
    return bucket < fraction


def split_documents(
    docs: Sequence[Document], *, split: Literal["train", "heldout", "all"], heldout_fraction: float
) -> list[tuple[int, Document]]:
    """``(corpus index, document)`` pairs of one side of the split, in corpus order."""
    if split == "all":
        return list(enumerate(docs))
    want = split == "heldout"
    return [(i, d) for i, d in enumerate(docs) if is_heldout(d.name, heldout_fraction) == want]


def _open_text(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LprError(
            f"corpus file {path} is not UTF-8 text (byte {err.start})",
            "convert it to UTF-8 or remove it from the corpus",
        ) from None


def _read_text(fs: fsspec.AbstractFileSystem, path: str) -> list[Document]:
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if any(p.endswith(s) for s in TEXT_SUFFIXES))
        return [Document(name=p, text=_open_text(fs, p)) for p in files]
    return [Document(name=path, text=_open_text(fs, path))]


def _read_jsonl(fs: fsspec.AbstractFileSystem, path: str, field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_open_text(fs, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LprError(f"{path}:{lineno} is not valid JSON ({err.msg})", "fix or drop that line") from None
        if not isinstance(row, dict) or field not in row:
            raise LprError(
                f"{path}:{lineno} has no field '{field}'",
                "set corpus.text_field (--text-field) to the field that holds the text",
            )
        if not isinstance(row[field], str):
            raise LprError(f"{path}:{lineno} field '{field}' is not a string", "point corpus.text_field at text")
        docs.append(Document(name=f"{path}:{lineno}", text=row[field]))
    return docs


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, field: str) -> list[Document]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    if field not in table.column_names:
        raise LprError(
            f"{path} has no column '{field}' (columns: {', '.join(table.column_names)})",
            "set corpus.text_field (--text-field) to the column that holds the text",
        )
    return [Document(name=f"{path}:{i}", text=t) for i, t in enumerate(table.column(field).to_pylist()) if t]


def _read_dataset(source: str, field: str) -> list[Document]:
    import datasets

    if source.startswith("hf:"):
        data = datasets.load_dataset(source.removeprefix("hf:"), split="train")
    else:
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else data[next(iter(data))]
    if field not in data.column_names:
        raise LprError(
            f"dataset {source} has no column '{field}' (columns: {', '.join(data.column_names)})",
            "set corpus.text_field (--text-field) to the column that holds the text",
        )
    return [Document(name=f"{source}:{i}", text=t) for i, t in enumerate(data[field]) if t]


def detect_format(source: str) -> str:
    """The corpus format implied by a source string (``corpus.format: auto``)."""
    if source == "demo":
        return "demo"
    if source.startswith("hf:"):
        return "datasets"
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise LprError(f"corpus {source} does not exist", "pass an existing file, folder or URL as --corpus")
    if fs.isdir(path):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        return "datasets" if {"dataset_info.json", "state.json"} & names or "dataset_dict.json" in names else "text"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
        if path.endswith(suffix):
            return fmt
    return "text"


def load_documents(cfg: CorpusConfig) -> list[Document]:
    """Every document of the configured source, in a stable order. Raises if there are none."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt == "demo":
        from pipeline.demo_corpus import demo_documents

        docs = demo_documents(max_chars=cfg.demo_max_chars)
    elif fmt == "datasets":
        docs = _read_dataset(cfg.source, cfg.text_field)
    else:
        fs, path = fsspec.core.url_to_fs(cfg.source)
        if not fs.exists(path):
            raise LprError(f"corpus {cfg.source} does not exist", "pass an existing file, folder or URL as --corpus")
        reader = {
            "text": lambda: _read_text(fs, path),
            "jsonl": lambda: _read_jsonl(fs, path, cfg.text_field),
            "parquet": lambda: _read_parquet(fs, path, cfg.text_field),
        }[fmt]
        docs = reader()
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise LprError(f"corpus {cfg.source} has no text", "point --corpus at files or rows that contain text")
    return docs


def iter_packed(
    docs: Sequence[tuple[int, Document]], *, tokenizer, seq_len: int, max_tokens: int | None
) -> Iterator[PackedSequence]:
    """Pack documents, each followed by EOS, into sequences of ``seq_len`` tokens.

    The last sequence may be shorter; ``max_tokens`` truncates the stream exactly.
    """
    eos = tokenizer.eos_token_id
    budget = max_tokens if max_tokens is not None else float("inf")
    ids_buf: list[int] = []
    doc_buf: list[int] = []
    emitted = 0
    for start in range(0, len(docs), 64):
        group = docs[start : start + 64]
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
