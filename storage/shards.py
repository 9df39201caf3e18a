"""Shard stores of a sharded dump: one states store per worker, merged into ``states.zarr`` at the end.

::

    RUN_DIR/
      states.zarr.shards/
        0_of_2/      a StatesWriter store (crash-safe appends, resumable) written by worker 0 only
        1_of_2/      … by worker 1 only
      states.zarr.partial/   the merge writes here; ``RunDir.commit`` renames it to states.zarr

Every worker writes under its own prefix, so no Zarr key (chunk or metadata) is written by two
processes; the shard's own attributes say which slice it holds (``shard_index``, ``shard_count``,
``batch_seqs``: packed sequences per batch; ``stream_batches``: batches in the whole stream,
written when the shard is complete).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from dataclasses import dataclass

from storage.errors import LprError
from storage.rundir import RunDir
from storage.states import StatesReader

SHARDS_DIR = "states.zarr.shards"
SHARD_ATTRS = ("shard_index", "shard_count", "batch_seqs", "stream_batches")
_NAME = re.compile(r"^(\d+)_of_(\d+)$")


@dataclass(frozen=True)
class ShardState:
    """What one shard store holds (read from its root attributes; nothing is loaded)."""

    index: int
    count: int
    fingerprint: str | None  # None: the store was started but has no readable root yet
    complete: bool
    rows: int  # committed rows

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)


def shard_name(index: int, count: int) -> str:
    return f"{index}_of_{count}"


def shard_path(run: RunDir, index: int, count: int) -> str:
    return run.path(SHARDS_DIR, shard_name(index, count))


def shard_url(run: RunDir, index: int, count: int) -> str:
    return run.url_of(shard_path(run, index, count))


def shard_states(run: RunDir) -> list[ShardState]:
    """Every shard store in the run directory (any count, any fingerprint), in (count, index) order."""
    run.fs.invalidate_cache(run.path(SHARDS_DIR))  # object stores cache listings; other workers add to this one
    try:
        entries = run.fs.ls(run.path(SHARDS_DIR), detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match is None:
            continue
        index, count = int(match[1]), int(match[2])
        try:
            attrs = StatesReader(shard_url(run, index, count), run.storage_options).attrs
        except (LprError, KeyError, ValueError, FileNotFoundError):
            attrs = {}
        found.append(
            ShardState(
                index=index,
                count=count,
                fingerprint=attrs.get("fingerprint"),
                complete=bool(attrs.get("complete")),
                rows=int(attrs.get("committed_rows", 0)),
            )
        )
    return sorted(found, key=lambda s: (s.count, s.index))


def open_shard(run: RunDir, index: int, count: int) -> StatesReader:
    return StatesReader(shard_url(run, index, count), run.storage_options)


def remove_tree(run: RunDir, path: str) -> None:
    """Remove ``path`` if it is there; another worker removing it at the same moment is no error."""
    with contextlib.suppress(FileNotFoundError):
        if run.fs.exists(path):
            run.fs.rm(path, recursive=True)


def remove_shard(run: RunDir, index: int, count: int) -> None:
    remove_tree(run, shard_path(run, index, count))


def remove_all_shards(run: RunDir) -> None:
    """After the merge is committed the shard stores are no longer needed."""
    remove_tree(run, run.path(SHARDS_DIR))


def place_chunks(run: RunDir, pairs: list[tuple[str, str]]) -> str:
    """Make each target chunk file hold its source's bytes without this process reading them.

    pairs: (source, target) paths inside the run directory. Local disk: a hard link (no byte is
    copied; the shard keeps its file until the shards are removed, so an interrupted merge loses
    nothing); an object store: a server-side copy. A target already there is replaced, so a resumed
    merge simply places every chunk again. Returns how: "link", "copy" (no hard links here) or
    "server-side copy".
    """
    if not run.is_local:
        run.fs.copy([src for src, _ in pairs], [dst for _, dst in pairs])
        return "server-side copy"
    how = "link"
    for src, dst in pairs:
        os.makedirs(posixpath.dirname(dst), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst)
        try:
            os.link(src, dst)
        except FileNotFoundError:
            raise LprError(f"the shard chunk {src} is missing", "dump that shard again with --force") from None
        except OSError:  # a file system without hard links, or another device
            run.fs.copy(src, dst)
            how = "copy"
    return how
