"""Documents and packed sequences, and the held-out split by document name (a hash, so it holds
wherever the corpus moves)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np


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
    docs: Iterable[tuple[int, Document]], *, split: Literal["train", "heldout", "all"], heldout_fraction: float
) -> Iterator[tuple[int, Document]]:
    """The ``(corpus index, document)`` pairs of one side of the split, streamed in corpus order."""
    for index, doc in docs:
        if split == "all" or is_heldout(doc.name, heldout_fraction) == (split == "heldout"):
            yield index, doc
