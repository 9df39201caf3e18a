"""The prototypes directory (cluster stage): per MoE layer, numpy tensors + JSON.

::

    prototypes/
      layer_000.safetensors   mean (H,), components (d, H), explained_variance (d,),
                              centroids (E, d) in cluster order, prices (E,) float64,
                              expert_of_cluster (E,) int64, cluster_of_expert (E,) int64
      layer_000.json          layer, module, fingerprint, latent_dim, variance_kept, stats
"""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.numpy import load, save

from storage.layer_files import read_layer_blob, read_layer_meta, write_layer_files
from storage.rundir import RunDir

TENSORS = ("mean", "components", "explained_variance", "centroids", "prices", "expert_of_cluster", "cluster_of_expert")


def write_layer(run: RunDir, directory: str, layer: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    blob = save({name: np.ascontiguousarray(tensors[name]) for name in TENSORS})
    write_layer_files(run, directory, layer, blob, meta)


def read_layer(run: RunDir, directory: str, layer: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One layer's tensors and metadata."""
    meta = read_layer_meta(run, directory, layer)
    if meta is None:
        raise FileNotFoundError(f"{directory}/{layer}.json")
    return load(read_layer_blob(run, directory, layer)), meta
