"""Peak memory of the cluster stage against the number of MoE layers it clusters, at a real geometry's widths.

The cluster stage is per-layer work: its peak memory should be set by the sample, block and latent
sizes, not by how many layers the store holds. This writes two synthetic states stores (random router
inputs, float16, the geometry's hidden size, experts and top-k; ``--rows`` rows, all sampled) with
``--layers`` and twice as many MoE layers, clusters every layer of each in a fresh process with the
default cluster settings (``cluster.sample_rows`` = ``pca_rows`` = the rows), and records the peak RSS
after each layer. The anchor is the smaller store: the JSON gives the larger one's peak against it.
Usage: ``python benchmarks/cluster_memory_layers.py [--geometry olmoe-1b-7b] [--layers 2] [--rows 32768]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scale_geometries import GEOMETRIES

from storage.rundir import RunDir
from storage.states import StatesWriter, StoreLayout

CHUNK = 4096

MEASURE = """
import json, resource, sys
from pipeline.config import build_config
from pipeline.stages.cluster import cluster_layer
from storage.rundir import RunDir
rows, layers = int(sys.argv[2]), int(sys.argv[3])
cfg = build_config({"cluster": {"sample_rows": rows, "pca_rows": rows}})
run, peaks = RunDir(sys.argv[1]), []
for i in range(layers):
    cluster_layer(cfg=cfg, run=run, layer=f"layer_{i:03d}", fp="memory")
    peaks.append(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
print(json.dumps(peaks))
"""


def synthetic_store(path: Path, *, layers: int, rows: int, hidden: int, experts: int, top_k: int) -> None:
    """A states store of ``rows`` random rows per layer (x float16 (rows, hidden)), in 4,096-row chunks."""
    run = RunDir(str(path))
    run.ensure()
    names = [f"model.layers.{i}.mlp.gate" for i in range(layers)]
    layout = StoreLayout(names, list(range(layers)), hidden, experts, top_k, "float16", CHUNK, "none")
    writer = StatesWriter.create(run.url_of(run.output_path("dump")), layout=layout, attrs={}, fingerprint="memory")
    rng = np.random.default_rng(0)
    for start in range(0, rows, CHUNK):
        per_layer = []
        for _ in range(layers):
            logits = torch.from_numpy(rng.normal(size=(CHUNK, experts)).astype(np.float32))
            weights, indices = torch.softmax(logits, -1).topk(top_k, -1)
            x = torch.from_numpy(rng.normal(size=(CHUNK, hidden)).astype(np.float16))
            per_layer.append({"x": x, "logits": logits, "topk_idx": indices.to(torch.int16), "topk_w": weights})
        shared = {
            "token_id": np.zeros(CHUNK, np.int32),
            "doc_id": np.arange(start, start + CHUNK) // 256,
            "position": np.arange(CHUNK, dtype=np.int32) % 256,
        }
        writer.append(shared, per_layer, CHUNK // 256)
    writer.finish({})


def peaks_mib(path: Path, *, rows: int, layers: int) -> list[float]:
    """Peak RSS (MiB) of one process after clustering each layer in turn."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(rows), str(layers)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="olmoe-1b-7b")
    parser.add_argument("--layers", type=int, default=2, help="layers of the smaller store (the larger has twice)")
    parser.add_argument("--rows", type=int, default=32_768, help="rows per layer, all sampled")
    args = parser.parse_args()
    g = GEOMETRIES[args.geometry]
    shape = {"hidden": g.hidden, "experts": g.experts, "top_k": g.top_k}
    result: dict = {"benchmark": "cluster_memory_layers", "geometry": g.name, "rows": args.rows, **shape}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (args.layers, 2 * args.layers):
            store = Path(tmp) / f"layers-{layers}"
            synthetic_store(store, layers=layers, rows=args.rows, **shape)
            peaks = peaks_mib(store, rows=args.rows, layers=layers)
            result[f"peaks_mib_{layers}_layers"] = peaks
            print(f"{layers} layers: peak RSS after each layer {peaks} MiB", flush=True)
    small, large = result[f"peaks_mib_{args.layers}_layers"][-1], result[f"peaks_mib_{2 * args.layers}_layers"][-1]
    result["peak_change_pct"] = round(100 * (large - small) / small, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
