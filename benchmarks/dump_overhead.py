"""Dump throughput vs a plain forward pass of the same model over the same batches.

The anchor is the forward pass the dump itself needs (the decoder stack, no hooks, no writes) over
exactly the batches the dump forms, built by the same input pipeline inside the timed loop, by a
freshly loaded model as in the dump stage (neither side gets an untimed warm-up batch). The
dump figure is the stage's own loop time from its manifest: forward + capture hooks + background
Zarr writes until the last row is committed. Runs alternate (plain, dump, plain, dump, …) so drift
in machine load hits both, after one uncounted warm-up round; the ratio is the median of the
per-round ratios (best-of shown too).

    python benchmarks/dump_overhead.py [--model demo|PATH] [--tokens 262144] [--repeats 5]

Human-readable lines, then one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("LPR_DISTILL_QUIET", "1")

from pipeline.config import build_config
from pipeline.data.corpus import iter_documents, iter_packed, split_documents
from pipeline.moe.loading import load_model, resolve_model_path
from pipeline.stages.dump import batched, forward_base, pad_batch, run_dump
from storage.rundir import RunDir


def plain_forward_tokens_per_second(cfg) -> float:
    """The anchor: a freshly loaded model (as the dump stage loads one) and the same input pipeline
    (stream, tokenise, pack, pad) and forward pass over the same batches; no capture, no writes."""
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    device = next(model.parameters()).device
    docs = split_documents(iter_documents(cfg.corpus), split="train", heldout_fraction=cfg.corpus.heldout_fraction)
    seqs = iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.corpus.seq_len, max_tokens=cfg.dump.max_tokens)
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for seq_batch in batched(seqs, cfg.dump.batch_tokens // cfg.corpus.seq_len):
            batch = pad_batch(seq_batch, tokenizer.pad_token_id)
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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = build_config(
        {"model": {"path": args.model}, "dump": {"max_tokens": args.tokens, "batch_tokens": args.batch_tokens}}
    )
    model, _ = load_model(cfg.model, resolve_model_path(cfg))  # for the parameter count
    print(
        f"model {cfg.model.path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{args.tokens:,} tokens, batches of {args.batch_tokens:,} tokens, torch threads {torch.get_num_threads()}"
    )
    plain, dump = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(os.path.join(tmp, "run"))
        run.ensure()
        plain_forward_tokens_per_second(cfg)  # warm-up round: one-time process costs (first kernels,
        run_dump(cfg=cfg, run=run, force=True)  # allocator growth) that a long dump amortises; not counted
        for i in range(args.repeats):
            plain.append(plain_forward_tokens_per_second(cfg))
            manifest = run_dump(cfg=cfg, run=run, force=True)
            dump.append(manifest.stats["tokens_per_second"])
            print(f"round {i + 1}: plain forward {plain[-1]:,.0f} tok/s, dump {dump[-1]:,.0f} tok/s")
    best_plain, best_dump = max(plain), max(dump)
    paired = sorted(d / p for p, d in zip(plain, dump, strict=True))
    ratio = paired[len(paired) // 2]
    print(
        f"dump / plain forward = {ratio:.3f} (median of {args.repeats} back-to-back pairs; best-of ratio "
        f"{best_dump / best_plain:.3f})"
    )
    print(
        json.dumps(
            {
                "benchmark": "dump_overhead",
                "model": cfg.model.path,
                "tokens": args.tokens,
                "batch_tokens": args.batch_tokens,
                "plain_forward_tokens_per_s": round(best_plain, 1),
                "dump_tokens_per_s": round(best_dump, 1),
                "ratio": round(ratio, 4),  # median of the per-round (dump / plain) ratios
                "best_of_ratio": round(best_dump / best_plain, 4),
                "plain_runs": [round(x, 1) for x in plain],
                "dump_runs": [round(x, 1) for x in dump],
            }
        )
    )


if __name__ == "__main__":
    main()
