"""LPR router forward vs the original gate on the same batch, and gate-level distillation throughput.

The anchor is the family's own router module (a linear gate + softmax + top-k) built from a
Qwen3-MoE config of the chosen width; the LPR router has the same hidden size, experts and top-k,
a latent of ``--latent`` dimensions and cosine similarity. Median of ``--repeats`` timings of each,
interleaved. Ends with one JSON line.
Usage: ``python benchmarks/router.py [--hidden 2048 --experts 128 --top-k 8 --tokens 8192]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from pipeline.router.lpr import LatentPrototypeRouter, spec_for
from pipeline.training.objectives import sinkhorn_balance


def timed(fn, x: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k
    )
    gate = Qwen3MoeTopKRouter(config).eval()
    torch.nn.init.normal_(gate.weight, std=0.02)
    lpr = LatentPrototypeRouter(spec_for(config, latent_dim=args.latent)).eval()
    x = torch.randn(args.tokens, args.hidden)
    for fn in (gate, lpr):  # warm-up
        timed(fn, x)
    gate_times, lpr_times = [], []
    for _ in range(args.repeats):
        gate_times.append(timed(gate, x))
        lpr_times.append(timed(lpr, x))
    gate_s, lpr_s = statistics.median(gate_times), statistics.median(lpr_times)
    print(f"original gate  {gate_s * 1e3:8.2f} ms / {args.tokens} tokens")
    print(f"LPR router     {lpr_s * 1e3:8.2f} ms  ({lpr_s / gate_s:.2f}×)")

    # gate-level distillation throughput: one optimiser step per batch of 4,096 rows
    lpr.train()
    optimizer = torch.optim.AdamW(lpr.parameters(), lr=1e-3)
    teacher = torch.randn(4096, args.experts)
    batch = x[:4096]
    steps, started = 20, time.perf_counter()
    for _ in range(steps):
        target = 0.5 * torch.softmax(teacher, -1) + 0.5 * sinkhorn_balance(torch.softmax(teacher, -1), 30)
        loss = -(target * F.log_softmax(lpr.scores(batch), -1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rows_per_second = steps * 4096 / (time.perf_counter() - started)
    print(f"distillation   {rows_per_second:,.0f} rows/s per layer")
    print(
        json.dumps(
            {
                "hidden": args.hidden,
                "experts": args.experts,
                "top_k": args.top_k,
                "latent": args.latent,
                "tokens": args.tokens,
                "gate_ms": round(gate_s * 1e3, 3),
                "lpr_ms": round(lpr_s * 1e3, 3),
                "lpr_over_gate": round(lpr_s / gate_s, 3),
                "distill_rows_per_s": round(rows_per_second),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
