"""Reading corpus sources into documents: plain-text files and folders (every text file, whatever its
name, and the rows of JSONL and Parquet files in them), JSONL, Parquet, and ``datasets`` datasets.
Local paths and fsspec URLs go through the same code."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from pipeline.data.documents import Document
from pipeline.errors import LprError

# Files a folder corpus reads as text whatever they hold: one that is not UTF-8 is an error, not skipped.
_TEXT_WORDS = (
    ".txt .text .md .rst .adoc .org .tex .py .pyi .ipynb .c .h .cc .cpp .cxx .hh .hpp .cu .rs .go .java "
    ".kt .scala .swift .m .mm .js .mjs .ts .tsx .jsx .rb .php .pl .lua .r .jl .hs .ml .ex .exs .erl .clj "
    ".sh .bash .zsh .ps1 .sql .html .htm .css .scss .xml .yaml .yml .toml .ini .cfg .conf .csv .tsv"
)
TEXT_SUFFIXES = frozenset(_TEXT_WORDS.split())
DATA_SUFFIXES = frozenset({".jsonl", ".parquet"})
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


def decode(raw: bytes, where: str) -> str:
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
        return decode(raw, file)
    if b"\0" in raw[:_SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_text(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    field: str = "text",
    suffixes: frozenset[str] | None = None,
    include: frozenset[str] | None = None,
    scan: FolderScan | None = None,
) -> Iterator[Document]:
    """One document per file: the file itself, or every text file of a folder (hidden ones aside), and
    every row of the folder's JSONL and Parquet files (``field`` holds the text).

    In a folder, ``suffixes`` (``corpus.suffixes``; ``""`` for files without one) restricts which
    files are read, ``include`` (``corpus.include``) names them; unset, every file that is text is read.
    """
    if not fs.isdir(path):
        with fs.open(path, "rb") as handle:
            yield Document(name=_name(path), text=decode(handle.read(), path))
        return
    scan = scan if scan is not None else FolderScan()
    root = path.rstrip("/")
    for file in sorted(fs.find(path)):
        relative = posixpath.relpath(file, root)
        if _hidden(relative) or (include is not None and relative not in include):
            continue
        scan.files += 1
        suffix = posixpath.splitext(file)[1].lower()
        if suffixes is not None and suffix not in suffixes:
            scan.skip("not in corpus.suffixes", file)
            continue
        if suffix in DATA_SUFFIXES:
            reader = read_jsonl if suffix == ".jsonl" else read_parquet
            yield from reader(fs, file, field, relative)
            continue
        with fs.open(file, "rb") as handle:
            text = _folder_text(handle.read(), file)
        if text is None:
            scan.skip("not text", file)
        elif not text.strip():
            scan.skip("empty", file)
        else:
            yield Document(name=relative, text=text)


def read_jsonl(fs: fsspec.AbstractFileSystem, path: str, field: str, name: str | None = None) -> Iterator[Document]:
    name = name or _name(path)
    with fs.open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = decode(raw, f"{path}:{lineno}")
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
            yield Document(name=f"{name}:{lineno}", text=row[field])


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


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, field: str, name: str | None = None) -> Iterator[Document]:
    name = name or _name(path)
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
                yield Document(name=f"{name}:{row}", text=text or "")
                row += 1


def read_dataset(source: str, field: str) -> Iterator[Document]:
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
