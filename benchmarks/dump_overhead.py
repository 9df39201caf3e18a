"""Dump throughput vs a plain forward pass of the same model over the same batches.

The anchor is the forward pass the dump itself needs (the decoder stack, no hooks, no writes) over
exactly the batches the dump forms, built by the same input pipeline inside the timed loop. The
dump figure is the stage's own loop time from its manifest: forward + capture hooks + background
Zarr writes until the last row is committed. Runs alternate (plain, dump, plain, dump, …) so drift
in machine load hits both; the best of each is compared.

    python benchmarks/dump_overhead.py [--model demo|PATH] [--tokens 262144] [--repeats 3]

Human-readable lines, then one JSON line of figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("LPR_DISTILL_QUIET", "1")

from pipeline.config import build_config
from pipeline.corpus import iter_documents, iter_packed, split_documents
from pipeline.dump import batched, forward_base, pad_batch, run_dump
from pipeline.models import load_model, resolve_model_path
from storage.rundir import RunDir


def plain_forward_tokens_per_second(cfg, model, tokenizer) -> float:
    """The anchor: the same input pipeline (stream, tokenise, pack, pad) and forward pass, no capture, no writes."""
    device = next(model.parameters()).device

    def batches():
        docs = split_documents(iter_documents(cfg.corpus), split="train", heldout_fraction=cfg.corpus.heldout_fraction)
        seqs = iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.corpus.seq_len, max_tokens=cfg.dump.max_tokens)
        for batch in batched(seqs, cfg.dump.batch_tokens // cfg.corpus.seq_len):
            yield pad_batch(batch, tokenizer.pad_token_id)

    tokens = 0
    with torch.inference_mode():
        forward_base(model, next(batches()), device)  # warm-up, not timed (the dump's first batch is timed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches():
            forward_base(model, batch, device)
            tokens += len(batch["token_id"])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--batch-tokens", type=int, default=8_192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = build_config(
        {"model": {"path": args.model}, "dump": {"max_tokens": args.tokens, "batch_tokens": args.batch_tokens}}
    )
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    print(
        f"model {cfg.model.path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{args.tokens:,} tokens, batches of {args.batch_tokens:,} tokens, torch threads {torch.get_num_threads()}"
    )
    plain, dump = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(os.path.join(tmp, "run"))
        run.ensure()
        for i in itertools.islice(itertools.count(), args.repeats):
            plain.append(plain_forward_tokens_per_second(cfg, model, tokenizer))
            manifest = run_dump(cfg=cfg, run=run, force=True)
            dump.append(manifest.stats["tokens_per_second"])
            print(f"round {i + 1}: plain forward {plain[-1]:,.0f} tok/s, dump {dump[-1]:,.0f} tok/s")
    best_plain, best_dump = max(plain), max(dump)
    ratio = best_dump / best_plain
    print(f"dump / plain forward = {ratio:.3f} (best of {args.repeats} each)")
    print(
        json.dumps(
            {
                "benchmark": "dump_overhead",
                "model": cfg.model.path,
                "tokens": args.tokens,
                "batch_tokens": args.batch_tokens,
                "plain_forward_tokens_per_s": round(best_plain, 1),
                "dump_tokens_per_s": round(best_dump, 1),
                "ratio": round(ratio, 4),
                "plain_runs": [round(x, 1) for x in plain],
                "dump_runs": [round(x, 1) for x in dump],
            }
        )
    )


if __name__ == "__main__":
    main()
