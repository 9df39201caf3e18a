"""The whole pipeline at a production geometry: seconds, peak memory and bytes per stage, and the full model.

Builds a random-initialised transformers model of the geometry's family at its published widths
(``scale_geometries.py``: hidden size, experts and their width, top-k, groups, vocabulary) with
``--layers`` MoE layers, and a byte-level BPE tokenizer trained on the demo corpus (the standard
library's text, written as a JSONL corpus), then runs every stage through the project's own stage
functions, each in its own process (``scale_stages.py``): dump, cluster, distill (gate level, then
model level with the in-model calibration), validate (no lm-eval: ``validate.tasks=[]``), export (and
loading the export). The per-layer sample sizes (cluster, calibration, buffer) are the geometry's
``sample``, below its token budget, so that a run with twice the tokens has the same configured
memory. Separately, one layer is clustered at the default sample (262,144 rows; the rows beyond the
dumped ones are dumped rows with noise: ``scale_stages.fill_store``): the cluster seconds per layer.

Prints a table (per stage: seconds, peak RSS of its process, bytes written) and ends with one JSON
line: per-layer and per-token costs, and the full model at the default budgets (``scale_plan.py``).
The anchor is the dump: every other stage is also given as a multiple of its seconds per layer.
Usage: ``python benchmarks/scale.py --geometry qwen3-30b-a3b [--layers 2] [--tokens N]``;
``--save`` keeps the JSON in ``benchmarks/results/``; ``--table`` writes ``docs/planning.md`` from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from scale_geometries import GEOMETRIES, Geometry, layer_flops
from scale_plan import extrapolate, load_results, write_table
from scale_stages import STAGES, run_stage

from pipeline.config import RunConfig, build_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 128  # the benchmark's sequences (the default is 256): half the whole-model work per sequence


def bench_config(
    g: Geometry, *, checkpoint: Path, corpus: Path, tokens: int, sample: int, dtype: str
) -> dict[str, Any]:
    """The run configuration: the defaults, except token budgets and per-layer sizes cut to fit 30 minutes."""
    return {
        "seed": 0,
        "model": {"path": str(checkpoint), "dtype": dtype},
        "corpus": {"source": str(corpus), "format": "jsonl", "seq_len": SEQ_LEN},
        "dump": {"max_tokens": tokens, "batch_tokens": 16 * SEQ_LEN},
        "cluster": {"sample_rows": sample, "pca_rows": sample},
        "router": {"calibration_rows": sample},
        "distill": {
            "steps": 20,
            "eval_every": 10,
            "buffer_rows": sample,
            "val_rows": 4096,
            "model_steps": 2,
            "model_batch_sequences": 2,
            "model_val_sequences": 2,
            "model_eval_every": 2,
            "model_calibration_sequences": 4,
            "calibration_sequences": 8,
        },
        # the bias baseline at strengths 0 and 1 only (both measured anyway): 4 held-out passes, not 8
        "validate": {"tasks": [], "sequences": 8, "batch_size": 4, "bias_strengths": [0.0, 1.0]},
    }


def corpus_for(workdir: Path) -> Path:
    """The demo corpus (6 M characters of the standard library's text) as a JSONL file in ``workdir``: a
    corpus like a user's, so validate measures its held-out documents without the demo's slices."""
    path = workdir / "corpus.jsonl"
    if not path.exists():
        from pipeline.demo.corpus import demo_documents

        lines = (json.dumps({"name": d.name, "text": d.text}) for d in demo_documents(max_chars=6_000_000))
        path.write_text("\n".join(lines) + "\n")
    return path


def tokenizer_for(workdir: Path):
    """A byte-level BPE tokenizer (8,192 tokens) trained on the corpus, cached in ``workdir``."""
    from transformers import PreTrainedTokenizerFast

    path = workdir / "tokenizer"
    if not (path / "tokenizer.json").exists():
        from pipeline.data.corpus import Document
        from pipeline.demo.model import train_tokenizer

        rows = [json.loads(line) for line in corpus_for(workdir).read_text().splitlines()]
        docs = [Document(name=row["name"], text=row["text"]) for row in rows]
        train_tokenizer(docs, vocab_size=8192).save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def checkpoint_for(g: Geometry, layers: int, workdir: Path, dtype: str) -> tuple[Path, dict[str, Any] | None]:
    """The geometry's checkpoint with ``layers`` MoE layers, built once (in a child) and then reused:
    (path, what building it took, or None when reused)."""
    dtype = "float32" if dtype == "float32" else "bfloat16"
    path = workdir / f"model-{g.name}-{layers}-{dtype}"
    if (path / "config.json").exists():
        return path, None
    tokenizer_for(workdir)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    spec = {"geometry": g.name, "layers": layers, "tokenizer": str(workdir / "tokenizer"), "dtype": dtype}
    (partial / "build.json").write_text(json.dumps(spec))
    built = run_stage("build", partial, log=workdir / "build.log")
    partial.rename(path)
    return path, built


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def _commit() -> str:
    """The commit the run starts from, ``+changes`` when pipeline/, storage/ or benchmarks/ differ from it."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    paths = ["pipeline", "storage", "benchmarks"]
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT).returncode != 0
    return (out.stdout.strip() or "unknown") + ("+changes" if changed else "")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    g = GEOMETRIES[args.geometry]
    commit = _commit()
    tokens = args.tokens or g.tokens
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, built = checkpoint_for(g, args.layers, workdir, args.dtype)
    run_dir = workdir / f"run-{g.name}-{args.layers}-{tokens}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    corpus = corpus_for(workdir)
    sample = args.sample or g.sample
    config = bench_config(g, checkpoint=checkpoint, corpus=corpus, tokens=tokens, sample=sample, dtype=args.dtype)
    build_config(config)  # fails here on a bad value, not in a child
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = run_dir / "stages.log"
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        stages[stage] = run_stage(stage, run_dir, log=log)
        print(f"{stage:>14}: {stages[stage]['seconds']:8.1f} s  {stages[stage]['peak_rss_mib']:9.0f} MiB", flush=True)
    stages["cluster"]["seconds_per_layer"] = round(stages["cluster"]["seconds"] / args.layers, 2)
    if args.cluster_rows:
        fill_dir = workdir / f"fill-{g.name}-{args.cluster_rows}"
        shutil.rmtree(fill_dir, ignore_errors=True)
        fill_dir.mkdir()
        source = str(run_dir / "states.zarr")
        (fill_dir / "fill.json").write_text(json.dumps({"source": source, "rows": args.cluster_rows, "seed": 0}))
        default_cluster = {"cluster": RunConfig().cluster.model_dump(mode="json")}
        (fill_dir / "config.yaml").write_text(yaml.safe_dump(config | default_cluster, sort_keys=False))
        run_stage("fill", fill_dir, log=log)
        sample = stages["cluster-sample"] = run_stage("cluster-sample", fill_dir, log=log)
        sample["seconds_per_layer"] = sample["layers"]["layer_000"]["seconds"]
        sample["rows"] = args.cluster_rows
        print(f"{'cluster-sample':>14}: {sample['seconds']:8.1f} s  {sample['peak_rss_mib']:9.0f} MiB", flush=True)
        if not args.keep:
            shutil.rmtree(fill_dir)
    result = summarise(g, args, tokens, stages, built, build_config(config)) | {"commit": commit}
    if not args.keep:
        shutil.rmtree(run_dir)
    return result


def summarise(
    g: Geometry, args: argparse.Namespace, tokens: int, stages: dict, built: dict | None, cfg: RunConfig
) -> dict[str, Any]:
    layers = args.layers
    dump_per_layer = stages["dump"]["seconds"] / layers
    sample = stages.get("cluster-sample")
    result = {
        "benchmark": "scale",
        "geometry": g.name,
        "source": g.source,
        "layers": layers,
        "tokens": tokens,
        "seq_len": SEQ_LEN,
        "dtype": args.dtype,
        "device": _device(),
        "load_average": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
        "reduced": g.why,
        "build": built,  # None: the checkpoint was built by an earlier run
        "stages": stages,
        "per_layer_seconds": {name: round(s["seconds"] / layers, 2) for name, s in stages.items()},
        "per_token_ms": {
            "dump": round(1e3 * stages["dump"]["loop_seconds"] / tokens, 3),
            "dump_per_layer": round(1e3 * stages["dump"]["loop_seconds"] / tokens / layers, 3),
        },
        "vs_dump_per_layer": {name: round(s["seconds"] / layers / dump_per_layer, 2) for name, s in stages.items()},
        "gflop_per_token_layer": round(layer_flops(g, built=True) / 1e9, 3),
        "cluster_seconds_per_layer": sample["seconds_per_layer"] if sample else stages["cluster"]["seconds_per_layer"],
        "cluster_rows": sample["rows"] if sample else min(cfg.cluster.sample_rows, tokens),
        "cluster_slots_exact": all(
            s["layers"][k]["size_max"] - s["layers"][k]["size_min"] <= 1
            for s in filter(None, (stages["cluster"], sample))
            for k in s["layers"]
        ),
    }
    result["full_model"] = extrapolate(result, cfg)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['geometry']}: {result['layers']} MoE layers, {result['tokens']:,} tokens ({result['reduced']})")
    print(f"{'stage':>14} {'seconds':>9} {'peak RSS MiB':>13} {'bytes written':>15} {'× dump/layer':>13}")
    for name, stage in result["stages"].items():
        ratio = result["vs_dump_per_layer"][name]
        print(f"{name:>14} {stage['seconds']:9.1f} {stage['peak_rss_mib']:13.0f} {stage['bytes']:15,} {ratio:13.2f}")
    full = result["full_model"]
    print(f"full model ({full['moe_layers']} MoE layers, {full['tokens']:,} tokens): states {full['states_gb']} GB;")
    print("  hours: " + ", ".join(f"{k} {v}" for k, v in full["hours"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=list(GEOMETRIES))
    parser.add_argument("--layers", type=int, default=2, help="MoE layers of the model built (default 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens dumped (default: the geometry's)")
    parser.add_argument("--sample", type=int, default=None, help="per-layer sample rows (default: the geometry's)")
    parser.add_argument("--cluster-rows", type=int, default=RunConfig().cluster.sample_rows, help="0: skip")
    parser.add_argument("--dtype", default="float32", help="model.dtype (a GPU: bfloat16)")
    parser.add_argument("--workdir", default="/tmp/lpr-scale", help="checkpoints (reused) and run directories")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--save", action="store_true", help="write the JSON to benchmarks/results/")
    parser.add_argument("--table", action="store_true", help="write docs/planning.md from benchmarks/results/")
    args = parser.parse_args()
    if args.table:
        write_table(load_results(RESULTS), ROOT / "docs" / "planning.md")
        print(f"wrote {ROOT / 'docs' / 'planning.md'}")
        return
    if not args.geometry:
        parser.error("--geometry is required (or --table)")
    result = run_benchmark(args)
    print_table(result)
    line = json.dumps(result, default=float)
    if args.save:
        g = GEOMETRIES[result["geometry"]]
        variant = "" if (args.layers, result["tokens"]) == (2, g.tokens) else f"-{args.layers}L-{result['tokens']}T"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"scale-{g.name}{variant}.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
