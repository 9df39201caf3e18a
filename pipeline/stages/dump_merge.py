"""The merge of a sharded dump: N complete shard stores → one states store, rows in stream order.

Worker i of N dumped the batches g ≡ i (mod N) of the train split's packed-sequence stream (see
``pipeline.stages.dump_shards``), each batch formed exactly as the single-process dump forms it. Putting
the batches back in the order g = 0, 1, 2, … therefore gives the single-process store row for row.
When each batch is one chunk (the default ``chunk_rows``), the merge places the shards' chunk files
under their merged names (hard links on local disk, server-side copies on object storage) and
writes only metadata; otherwise it is a crash-safe append (``StatesWriter``) of the rows, a chunk at
a time, and a killed merge resumes at its first uncommitted batch. Either way the shard stores stay
intact until the merged store is committed, so an interrupted merge can always be redone.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.errors import LprError
from pipeline.progress import info
from storage.rundir import RunDir
from storage.shards import SHARD_ATTRS, open_shard, place_chunks, shard_path, shard_states
from storage.states import StatesReader, StatesWriter


def batch_bounds(positions: np.ndarray, seqs_per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets of a shard's batches and the sequences in each.

    positions: (rows,) int32, each token's position in its packed sequence (0 starts a sequence).
    Returns bounds (batches + 1,) int64 — batch b is rows [bounds[b], bounds[b + 1]) — and
    seqs (batches,) int64.
    """
    starts = np.flatnonzero(positions == 0)
    first = starts[::seqs_per_batch]
    bounds = np.append(first, len(positions)).astype(np.int64)
    seqs = np.minimum(seqs_per_batch, len(starts) - np.arange(len(first)) * seqs_per_batch)
    return bounds, seqs.astype(np.int64)


def complete_shards(run: RunDir, *, count: int, fingerprint: str) -> list[StatesReader]:
    """Readers of shards 0 … count−1, or one error naming every shard that is not complete yet."""
    found = {s.index: s for s in shard_states(run) if s.count == count and s.fingerprint == fingerprint}
    missing = []
    for index in range(count):
        state = found.get(index)
        if state is None:
            missing.append(f"{index}/{count} (not started)")
        elif not state.complete:
            missing.append(f"{index}/{count} ({state.rows:,} rows so far)")
    if missing:
        raise LprError(
            f"the sharded dump in {run.url} is not complete: shard {', '.join(missing)}",
            f"run `lpr-distill dump {run.url} --shard I/{count}` for each (at once, on any machines), "
            "then run `lpr-distill dump` again to merge",
        )
    return [open_shard(run, index, count) for index in range(count)]


def _check_slices(shards: list[StatesReader], bounds: list[np.ndarray], seqs: list[np.ndarray]) -> int:
    """The number of batches in the stream, after checking that the shards hold exactly its slices."""
    count = len(shards)
    totals = {int(shard.attrs["stream_batches"]) for shard in shards}
    per_batch = {int(shard.attrs["batch_seqs"]) for shard in shards}
    if len(totals) != 1 or len(per_batch) != 1:
        raise LprError("the shard stores disagree on the stream they were cut from", "dump them again with --force")
    total = totals.pop()
    for index, shard in enumerate(shards):
        expected = len(range(index, total, count))
        if len(bounds[index]) - 1 != expected or int(seqs[index].sum()) != shard.attrs["committed_seqs"]:
            raise LprError(
                f"shard {index}/{count} holds {len(bounds[index]) - 1} batches, its slice of the stream has {expected}",
                f"dump that shard again with `--shard {index}/{count} --force`",
            )
    return total


def merge_shards(*, run: RunDir, count: int, fingerprint: str, store_url: str) -> dict[str, Any]:
    """Write every complete shard's rows into the store at ``store_url`` in stream order; returns stats.

    When every batch is one chunk of its shard (``chunk_rows`` = rows per batch, the default) the
    chunk files are placed (hard links locally, server-side copies on object storage): no row is
    read or written by this process. Otherwise the rows are read and rewritten, a chunk at a time.
    """
    started = time.time()
    shards = complete_shards(run, count=count, fingerprint=fingerprint)
    per_batch = int(shards[0].attrs["batch_seqs"])
    cuts = [batch_bounds(shard.read("position"), per_batch) for shard in shards]
    bounds, seqs = [c[0] for c in cuts], [c[1] for c in cuts]
    total = _check_slices(shards, bounds, seqs)
    writer = StatesWriter.resume(store_url, fingerprint=fingerprint, storage_options=run.storage_options)
    if writer is None:
        writer = StatesWriter.create(
            store_url,
            layout=shards[0].layout(),
            attrs={k: v for k, v in shards[0].own_attrs().items() if k not in SHARD_ATTRS},
            fingerprint=fingerprint,
            storage_options=run.storage_options,
        )
    resumed_rows = writer.committed_rows
    if _chunks_are_batches(shards, bounds, total):
        how: list[str] = []
        pairs = _chunk_pairs(run, shards, total)
        rows, n_seqs = sum(shard.num_rows for shard in shards), sum(int(s.sum()) for s in seqs)
        writer.adopt_rows(rows, n_seqs, lambda: how.append(place_chunks(run, pairs)))
        mode = how[0]
    else:
        _rewrite(shards, bounds, seqs, total, writer, store_url)
        mode = "rewrite"
    writer.finish({})
    seconds = time.time() - started
    return {
        "shards": count,
        "batches": total,
        "merge": mode,
        "resumed_from_row": resumed_rows,
        "merge_seconds": round(seconds, 3),
        "merge_rows_per_second": round((writer.committed_rows - resumed_rows) / max(seconds, 1e-9), 1),
        "shard_rows": [shard.num_rows for shard in shards],
    }


def _rewrite(
    shards: list[StatesReader],
    bounds: list[np.ndarray],
    seqs: list[np.ndarray],
    total: int,
    writer: StatesWriter,
    store_url: str,
) -> None:
    """Append the batches in stream order, from the first one ``writer`` has not committed (a killed
    merge, or a single-process partial of the same fingerprint: the same rows), a chunk at a time."""
    count = len(shards)
    first, done = 0, 0
    while first < total and done < writer.committed_seqs:
        done += int(seqs[first % count][first // count])
        first += 1
    if done != writer.committed_seqs:
        raise LprError(
            f"the partial states store {store_url} ends inside a batch", "merge again with `lpr-distill dump --force`"
        )
    if writer.committed_rows:
        info(f"[bold]dump[/]: resuming the merge at row {writer.committed_rows:,} (batch {first:,} of {total:,})")
    chunk = int(writer.attrs["chunk_rows"])
    group: list[int] = []
    for g in range(first, total):
        group.append(g)
        rows = sum(_rows(bounds, count, b) for b in group)
        if (writer.committed_rows + rows) % chunk == 0 or rows >= chunk or g == total - 1:
            _copy(shards, bounds, seqs, group, writer)
            group = []


def _chunks_are_batches(shards: list[StatesReader], bounds: list[np.ndarray], total: int) -> bool:
    """Whether every batch is exactly one chunk in its shard (``chunk_rows`` = rows per batch, the
    default): then global batch g is chunk g of the merged store, and the merge places chunk files."""
    chunk = shards[0].chunk_rows
    if any(shard.chunk_rows != chunk or shard.attrs["codec"] != shards[0].attrs["codec"] for shard in shards):
        return False
    for index, bound in enumerate(bounds):
        sizes = np.diff(bound)
        last_is_stream_end = index == (total - 1) % len(shards)
        if (sizes[:-1] != chunk).any() or sizes[-1] > chunk or (sizes[-1] != chunk and not last_is_stream_end):
            return False
    return True


def _chunk_pairs(run: RunDir, shards: list[StatesReader], total: int) -> list[tuple[str, str]]:
    """(shard chunk file, merged chunk file) for every array and batch: batch g is chunk g // N of shard g % N."""
    target = run.partial_path("dump")
    count, pairs = len(shards), []
    for key in shards[0].array_keys():
        meta = shards[0].group[key].metadata
        tail = (0,) * (len(meta.shape) - 1)
        for g in range(total):
            source = shard_path(run, g % count, count)
            pairs.append(
                (
                    f"{source}/{key}/{meta.encode_chunk_key((g // count, *tail))}",
                    f"{target}/{key}/{meta.encode_chunk_key((g, *tail))}",
                )
            )
    return pairs


def _rows(bounds: list[np.ndarray], count: int, g: int) -> int:
    b = bounds[g % count]
    return int(b[g // count + 1] - b[g // count])


def _copy(
    shards: list[StatesReader],
    bounds: list[np.ndarray],
    seqs: list[np.ndarray],
    group: list[int],
    writer: StatesWriter,
) -> None:
    """Append global batches ``group`` (consecutive) to ``writer`` as one commit."""
    count = len(shards)
    parts = []
    for g in group:
        shard, local = g % count, g // count
        parts.append(shards[shard].read_rows(int(bounds[shard][local]), int(bounds[shard][local + 1])))
    values = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    writer.append_rows(values, sum(int(seqs[g % count][g // count]) for g in group))
