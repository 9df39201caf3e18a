"""One worker of a sharded dump: shard i of N dumps the batches g ≡ i (mod N) of the stream.

The stream is the train split's packed sequences in corpus order, cut into batches of
``batch_tokens // seq_len`` sequences, exactly as the single-process dump cuts it. Sharding by
batch (not by sequence or by contiguous range): every worker forms the very batches that one
process would, so the forward passes — and the stored rows — are the same bit for bit; the slice
needs no count of the stream in advance (each worker tokenizes the stream and skips the other
batches, which costs far less than the forward passes it saves); and the workers' loads differ by
at most one batch. Each worker appends to its own crash-safe store (``storage.shards``), so a
killed worker resumes where it stopped; ``run_dump`` merges the shards once all are complete and
only then commits the stage's manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.data.corpus import PackedSequence
from pipeline.errors import LprError
from pipeline.progress import info
from pipeline.stages.dump import STAGE, batch_seqs, batched, dump_stream, plan_dump
from storage.rundir import RunDir
from storage.shards import remove_shard, remove_tree, shard_states, shard_url

_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (0 ≤ index < count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"I/N"`` → ShardSpec, or a one-line error that says what is wrong with it."""
        match = _SPEC.match(text)
        if match is None:
            raise LprError(f"--shard {text!r} should be I/N, e.g. 0/2", "pass the shard index and the shard count")
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise LprError(f"--shard {text}: the shard count N={count} should be ≥ 1", "e.g. --shard 0/2")
        if not 0 <= index < count:
            raise LprError(
                f"--shard {text}: the shard index I={index} should be in 0 … {count - 1}",
                f"shards are numbered from 0: --shard 0/{count} … --shard {count - 1}/{count}",
            )
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_slice(
    sequences: Iterable[PackedSequence], *, per_batch: int, shard: ShardSpec, seen: list[int]
) -> Iterator[PackedSequence]:
    """The sequences of the batches g ≡ shard.index (mod shard.count); ``seen[0]`` ends as the
    number of batches in the whole stream (once the iterator is exhausted)."""
    for g, batch in enumerate(batched(sequences, per_batch)):
        seen[0] = g + 1
        if g % shard.count == shard.index:
            yield from batch


def dump_up_to_date(*, cfg: RunConfig, run: RunDir) -> bool:
    """Whether the dump's manifest matches ``cfg`` (a sharded rerun then starts no worker at all)."""
    return run.matching_manifest(STAGE, plan_dump(cfg).fingerprint) is not None


def run_dump_shard(*, cfg: RunConfig, run: RunDir, shard: ShardSpec, force: bool = False) -> dict[str, Any]:
    """Dump one shard into its own store (resumed after a kill); the manifest waits for the merge.

    Returns what it did: ``skipped`` (the dump is already committed), ``already_complete``, rows.
    """
    if cfg.dump.shards != shard.count:
        raise LprError(
            f"--shard {shard} does not match dump.shards={cfg.dump.shards}", f"set dump.shards={shard.count}"
        )
    plan = plan_dump(cfg)
    if not force and (done := run.matching_manifest(STAGE, plan.fingerprint)) is not None:
        info(f"[bold]dump[/]: up to date (manifest matches, finished {done.finished_at}); shard {shard} skipped")
        return {"shard": str(shard), "skipped": True, "rows": 0}
    _check_other_shards(run, shard, plan.fingerprint, force=force)  # before anything changes
    _invalidate(run)
    url = shard_url(run, shard.index, shard.count)
    if force:
        remove_shard(run, shard.index, shard.count)
        remove_tree(run, run.partial_path(STAGE))  # a merge of the old shards is stale now
    state = next((s for s in shard_states(run) if (s.index, s.count) == (shard.index, shard.count)), None)
    if state is not None and state.complete and state.fingerprint == plan.fingerprint:
        info(f"[bold]dump[/]: shard {shard} is already complete ({state.rows:,} rows)")
        return {"shard": str(shard), "skipped": False, "already_complete": True, "rows": state.rows}

    per_batch = batch_seqs(cfg)
    seen = [0]
    streamed = dump_stream(
        cfg=cfg,
        run=run,
        plan=plan,
        url=url,
        label=f"dump {shard}",
        budget=None if cfg.dump.max_tokens is None else -(-cfg.dump.max_tokens // shard.count),
        extra_attrs={"shard_index": shard.index, "shard_count": shard.count, "batch_seqs": per_batch},
        select=lambda sequences: shard_slice(sequences, per_batch=per_batch, shard=shard, seen=seen),
    )
    writer, new_rows, seconds = streamed.writer, streamed.new_rows, streamed.seconds
    if writer is None:
        raise LprError(
            f"shard {shard} has no rows: the train split makes only {seen[0]} batch(es) of {per_batch} sequences",
            f"use at most {max(seen[0], 1)} shards (start over with --force), or a smaller dump.batch_tokens",
        )
    writer.finish(
        {
            "corpus_documents": plan.corpus.documents,
            "train_documents": plan.corpus.train_documents,
            "stream_batches": seen[0],
        }
    )
    info(f"[bold]dump[/]: shard {shard} complete, {writer.committed_rows:,} rows ({new_rows:,} this run)")
    return {
        "shard": str(shard),
        "skipped": False,
        "rows": writer.committed_rows,
        "rows_this_run": new_rows,
        "resumed_from_row": streamed.resumed_rows,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_rows / max(seconds, 1e-9), 1),
    }


def _invalidate(run: RunDir) -> None:
    """The dump's manifest (and every later one) goes: workers at once may race to remove the same file."""
    for _ in range(5):
        try:
            run.invalidate(STAGE)
            return
        except FileNotFoundError:
            continue


def _check_other_shards(run: RunDir, shard: ShardSpec, fp: str, *, force: bool) -> None:
    """Refuse to mix shard counts in one dump (``--force`` discards the other count's shards).

    Stores of another config are left alone: the merge ignores them and its commit removes them,
    and removing them here could race with the worker that is replacing its own.
    """
    for other in shard_states(run):
        if other.count == shard.count or other.fingerprint != fp:
            continue
        if not force:
            raise LprError(
                f"the partial dump in {run.url} is sharded {other.count} ways (shard {other.index}/{other.count}), "
                f"but --shard {shard} asks for {shard.count}",
                f"pass --shard I/{other.count}, or discard the partial shards with --force",
            )
        remove_shard(run, other.index, other.count)
