"""The prototypes directory: one safetensors file and one JSON file per MoE layer.

::

    prototypes/
      layer_000.safetensors   mean (H,), components (d, H), explained_variance (d,),
                              centroids (E, d) in cluster order, prices (E,) float64,
                              expert_of_cluster (E,) int64, cluster_of_expert (E,) int64
      layer_000.json          layer, module, fingerprint, latent_dim, variance_kept, stats

Only safetensors and JSON are read back (no pickle). A layer's files are written JSON last, so a
layer whose JSON exists (with the stage's fingerprint) is complete.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from storage.rundir import RunDir

TENSORS = ("mean", "components", "explained_variance", "centroids", "prices", "expert_of_cluster", "cluster_of_expert")


def write_layer(run: RunDir, directory: str, layer: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write one layer's tensors, then its JSON (last: it marks the layer complete)."""
    run.fs.makedirs(directory, exist_ok=True)
    blob = save({name: np.ascontiguousarray(tensors[name]) for name in TENSORS})
    path = f"{directory}/{layer}.safetensors"
    with run.fs.open(path + ".tmp", "wb") as handle:
        handle.write(blob)
    run.fs.mv(path + ".tmp", path)
    run.write_text(f"{directory}/{layer}.json", json.dumps(meta, indent=2))


def read_layer_meta(run: RunDir, directory: str, layer: str) -> dict[str, Any] | None:
    text = run.read_text(f"{directory}/{layer}.json")
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def read_layer(run: RunDir, directory: str, layer: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One layer's tensors and metadata."""
    with run.fs.open(f"{directory}/{layer}.safetensors", "rb") as handle:
        tensors = load(handle.read())
    meta = read_layer_meta(run, directory, layer)
    if meta is None:
        raise FileNotFoundError(f"{directory}/{layer}.json")
    return tensors, meta


def copy_layer(run: RunDir, source: str, target: str, layer: str) -> None:
    run.fs.makedirs(target, exist_ok=True)
    run.fs.copy(f"{source}/{layer}.safetensors", f"{target}/{layer}.safetensors")
    run.fs.copy(f"{source}/{layer}.json", f"{target}/{layer}.json")
