"""Peak memory of clustering one layer is set by the sample and block sizes, not by the store size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from storage.rundir import RunDir
from storage.states import StatesWriter, StoreLayout

pytestmark = pytest.mark.slow

HIDDEN, EXPERTS, TOP_K = 512, 16, 2

MEASURE = """
import json, resource, sys
from pipeline.stages.cluster import cluster_layer
from pipeline.config import build_config
from storage.rundir import RunDir
cfg = build_config({"cluster": {"latent_dim": 16, "iterations": 3, "sample_rows": 8192, "pca_rows": 4096,
                                "block_rows": 2048}})
cluster_layer(cfg=cfg, run=RunDir(sys.argv[1]), layer="layer_000", fp="memory-test")
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _synthetic_store(run_dir, rows: int) -> None:
    """A states store of ``rows`` random rows (H = 512, float16: 1 KiB a row) in 4,096-row chunks."""
    run = RunDir(str(run_dir))
    run.ensure()
    layout = StoreLayout(["model.layers.0.mlp.gate"], [0], HIDDEN, EXPERTS, TOP_K, "float16", 4096, "none")
    writer = StatesWriter.create(run.url_of(run.output_path("dump")), layout=layout, attrs={}, fingerprint="f")
    rng = np.random.default_rng(0)
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        logits = torch.from_numpy(rng.normal(size=(n, EXPERTS)).astype(np.float32))
        weights, indices = torch.softmax(logits, -1).topk(TOP_K, -1)
        layer = {
            "x": torch.from_numpy(rng.normal(size=(n, HIDDEN)).astype(np.float16)),
            "logits": logits,
            "topk_idx": indices.to(torch.int16),
            "topk_w": weights,
        }
        shared = {
            "token_id": np.zeros(n, np.int32),
            "doc_id": np.arange(start, start + n) // 256,
            "position": np.arange(n, dtype=np.int32) % 256,
        }
        writer.append(shared, [layer], n // 256 or 1)
    writer.finish({})


def _peak_mib(run_dir) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(run_dir)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def test_peak_memory_does_not_grow_with_the_store(tmp_path):
    _synthetic_store(tmp_path / "small", 32_768)  # 32 MiB of x
    _synthetic_store(tmp_path / "large", 262_144)  # 256 MiB of x: 8× the rows, same sample
    small, large = _peak_mib(tmp_path / "small"), _peak_mib(tmp_path / "large")
    assert large - small < 40, (small, large)  # reading the whole layer would add ≥ 224 MiB
