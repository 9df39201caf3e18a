"""The built-in demo corpus: text that every CPython installation carries.

Three kinds of document, so experts have something to specialise on:

* ``topic``: the prose of the ``pydoc`` help topics (``pydoc_data.topics``);
* ``doc``:   the docstrings of one standard-library module, read with ``ast`` (never imported);
* ``code``:  the source of one module, cut at blank lines into pieces of at most ``piece_chars``.

Everything is deterministic for a given Python version: files are read in sorted order and the
size knob keeps documents in the order of a hash of their name, so a smaller corpus is a
subset of a larger one and keeps the mix of prose and code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.documents import Document

# Folders of the standard library that are tests, demos or vendored copies, not library text.
_SKIP_PARTS = {"test", "tests", "idle_test", "lib2to3", "turtledemo", "site-packages", "__pycache__"}


def _stable_rank(name: str) -> str:
    return hashlib.sha1(f"demo-order:{name}".encode()).hexdigest()  # independent of the split hash


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str, module: str) -> str:
    """All docstrings of a module, each under the qualified name it documents."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    parts: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n\n{doc}")
                visit(child, name)

    head = ast.get_docstring(tree)
    if head:
        parts.append(f"{module}\n\n{head}")
    visit(tree, module)
    return "\n\n".join(parts)


def _pieces(text: str, piece_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most about ``piece_chars`` characters."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        if current and size + len(block) > piece_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def _all_documents(piece_chars: int) -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(name=f"topic:{name}", text=topics[name])
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        rel = path.relative_to(root).with_suffix("").as_posix()
        module = rel.replace("/", ".").removesuffix(".__init__")
        source = path.read_text(encoding="utf-8", errors="replace")
        doc = _docstrings(source, module)
        if len(doc) > 200:
            for i, piece in enumerate(_pieces(doc, piece_chars)):
                yield Document(name=f"doc:{module}:{i}", text=piece)
        for i, piece in enumerate(_pieces(source, piece_chars)):
            yield Document(name=f"code:{module}:{i}", text=piece)


@functools.lru_cache(maxsize=2)
def _ranked_documents(piece_chars: int) -> tuple[Document, ...]:
    return tuple(sorted(_all_documents(piece_chars), key=lambda d: _stable_rank(d.name)))


KINDS = ("topic", "doc", "code")  # a document's kind is the start of its name: "doc:json.decoder:0"


def demo_documents(*, max_chars: int | None, piece_chars: int = 4_000, kind: str | None = None) -> list[Document]:
    """The demo corpus, at most ``max_chars`` characters (None: all of it), in a stable order.

    ``kind`` keeps the documents of one kind (``KINDS``) out of that corpus, under the same names, so
    they fall on the same side of the held-out split: ``--corpus demo:doc`` is the demo's docstrings.
    The full corpus is a few thousand documents (read once per process).
    """
    docs = _ranked_documents(piece_chars)
    if kind is not None:
        return [
            doc
            for doc in demo_documents(max_chars=max_chars, piece_chars=piece_chars)
            if doc.name.startswith(kind + ":")
        ]
    if max_chars is None:
        return list(docs)
    kept: list[Document] = []
    total = 0
    for doc in docs:
        if total + len(doc.text) > max_chars:
            continue
        kept.append(doc)
        total += len(doc.text)
    return kept
