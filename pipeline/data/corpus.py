"""Text sources → documents → a held-out split by document → packed token sequences.

Sources: plain text files or folders (one document per file), JSONL and Parquet (one document
per row, text in a named field), a ``datasets`` dataset saved with ``save_to_disk`` or named on
the hub as ``hf:NAME``, and the built-in demo corpus (``demo``). Local paths and fsspec URLs
are read through the same code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import fsspec
import numpy as np

from pipeline.data.documents import Document, PackedSequence, is_heldout, split_documents
from pipeline.errors import LprError

if TYPE_CHECKING:
    from pipeline.config import CorpusConfig

# Files a folder corpus reads as text whatever they hold: one that is not UTF-8 is an error, not skipped.
TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".text",
        ".md",
        ".rst",
        ".adoc",
        ".org",
        ".tex",
        ".py",
        ".pyi",
        ".ipynb",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".cxx",
        ".hh",
        ".hpp",
        ".cu",
        ".rs",
        ".go",
        ".java",
        ".kt",
        ".scala",
        ".swift",
        ".m",
        ".mm",
        ".js",
        ".mjs",
        ".ts",
        ".tsx",
        ".jsx",
        ".rb",
        ".php",
        ".pl",
        ".lua",
        ".r",
        ".jl",
        ".hs",
        ".ml",
        ".ex",
        ".exs",
        ".erl",
        ".clj",
        ".sh",
        ".bash",
        ".zsh",
        ".ps1",
        ".sql",
        ".html",
        ".htm",
        ".css",
        ".scss",
        ".xml",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".csv",
        ".tsv",
    ]
)
# Data files hold many documents each: read one with --corpus FILE (its rows become documents), never as one text.
DATA_SUFFIXES = frozenset({".jsonl", ".json", ".parquet", ".arrow"})
_SNIFF_BYTES = 8192


@dataclass
class FolderScan:
    """What reading a folder corpus saw: files in all, and those skipped by reason and extension."""

    files: int = 0
    skipped: dict[str, Counter] = field(default_factory=dict)  # reason → extension → count

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, Counter())[posixpath.splitext(path)[1].lower() or "no extension"] += 1

    def describe(self) -> str:
        parts = [
            f"{sum(kinds.values())} {reason} ({', '.join(f'{ext} ×{n}' for ext, n in kinds.most_common(4))})"
            for reason, kinds in self.skipped.items()
        ]
        return f"{self.files} files seen" + (f", skipped: {'; '.join(parts)}" if parts else "")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LprError(
            f"corpus file {where} is not UTF-8 text (byte {err.start})",
            "convert it to UTF-8 or remove it from the corpus",
        ) from None


def _name(path: str) -> str:
    """A corpus file's name in document names: where the corpus lives (a mount, a bucket) must not
    move documents between the train and held-out sides."""
    return posixpath.basename(path.rstrip("/"))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _folder_text(raw: bytes, file: str) -> str | None:
    """A folder file's text, or None when it is not text. A file named as text (``TEXT_SUFFIXES``) must
    decode; any other is sniffed: no NUL byte and valid UTF-8."""
    if posixpath.splitext(file)[1].lower() in TEXT_SUFFIXES:
        return _decode(raw, file)
    if b"\0" in raw[:_SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text(
    fs: fsspec.AbstractFileSystem, path: str, suffixes: frozenset[str] | None = None, scan: FolderScan | None = None
) -> Iterator[Document]:
    """One document per file: the file itself, or every text file of a folder (hidden ones aside).

    In a folder, ``suffixes`` (``corpus.suffixes``; ``""`` for files without one) restricts which
    files are read; unset, every file that is text is read, whatever its name.
    """
    if not fs.isdir(path):
        with fs.open(path, "rb") as handle:
            yield Document(name=_name(path), text=_decode(handle.read(), path))
        return
    scan = scan if scan is not None else FolderScan()
    root = path.rstrip("/")
    for file in sorted(fs.find(path)):
        relative = posixpath.relpath(file, root)
        if _hidden(relative):
            continue
        scan.files += 1
        suffix = posixpath.splitext(file)[1].lower()
        if suffixes is not None and suffix not in suffixes:
            scan.skip("not in corpus.suffixes", file)
            continue
        if suffixes is None and suffix in DATA_SUFFIXES:
            scan.skip("data files (pass one as --corpus FILE to read its rows)", file)
            continue
        with fs.open(file, "rb") as handle:
            text = _folder_text(handle.read(), file)
        if text is None:
            scan.skip("not text", file)
        elif not text.strip():
            scan.skip("empty", file)
        else:
            yield Document(name=relative, text=text)


def _read_jsonl(fs: fsspec.AbstractFileSystem, path: str, field: str) -> Iterator[Document]:
    with fs.open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = _decode(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LprError(f"{path}:{lineno} is not valid JSON ({err.msg})", "fix or drop that line") from None
            except RecursionError:
                raise LprError(
                    f"{path}:{lineno} is nested too deeply to read as JSON", "fix or drop that line"
                ) from None
            if not isinstance(row, dict) or field not in row:
                raise LprError(
                    f"{path}:{lineno} has no field '{field}'",
                    "set corpus.text_field (--text-field) to the field that holds the text",
                )
            if not isinstance(row[field], str):
                raise LprError(f"{path}:{lineno} field '{field}' is not a string", "point corpus.text_field at text")
            if not _encodable(row[field]):  # a JSON escape like "\ud800" decodes to half a character
                raise LprError(
                    f"{path}:{lineno} field '{field}' holds an unpaired surrogate (an escape like \\ud800)",
                    "fix or drop that line",
                )
            yield Document(name=f"{_name(path)}:{lineno}", text=row[field])


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _missing_column(where: str, field: str, columns: list[str]) -> LprError:
    return LprError(
        f"{where} has no column '{field}' (columns: {', '.join(columns)})",
        "set corpus.text_field (--text-field) to the column that holds the text",
    )


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise LprError(
                f"corpus file {path} is not a readable Parquet file ({str(err).splitlines()[0]})",
                "pass a Parquet file, or set corpus.format to the file's real format",
            ) from None
        if field not in parquet.schema_arrow.names:
            raise _missing_column(path, field, parquet.schema_arrow.names)
        kind = parquet.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LprError(
                f"{path} column '{field}' holds {kind}, not text",
                "set corpus.text_field (--text-field) to a text column",
            )
        row = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield Document(name=f"{_name(path)}:{row}", text=text or "")
                row += 1


def _read_dataset(source: str, field: str) -> Iterator[Document]:
    import datasets

    if source.startswith("hf:"):
        data = datasets.load_dataset(source.removeprefix("hf:"), split="train")
    else:
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else data[next(iter(data))]
    if field not in data.column_names:
        raise _missing_column(f"dataset {source}", field, data.column_names)
    row = 0
    for batch in data.select_columns([field]).iter(batch_size=1024):
        for text in batch[field]:
            yield Document(name=f"{source if source.startswith('hf:') else _name(source)}:{row}", text=text or "")
            row += 1


def _existing(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise LprError(f"corpus {source} does not exist", "pass an existing file, folder or URL as --corpus")
    return fs, path


def detect_format(source: str) -> str:
    """The corpus format implied by a source string (``corpus.format: auto``)."""
    if source == "demo":
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
        from pipeline.demo.corpus import demo_documents

        docs: Iterable[Document] = demo_documents(max_chars=cfg.demo_max_chars)
    elif fmt == "datasets":
        docs = _read_dataset(cfg.source, cfg.text_field)
    else:
        fs, path = _existing(cfg.source)
        readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
        suffixes = frozenset(s.lower() for s in cfg.suffixes) if cfg.suffixes is not None else None
        docs = readers[fmt](fs, path, suffixes, scan) if fmt == "text" else readers[fmt](fs, path, cfg.text_field)
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
