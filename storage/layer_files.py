"""Per-layer stage outputs: ``<directory>/<layer>.safetensors`` + ``<layer>.json``, JSON written last.

The cluster stage (``prototypes/``) and the distill stage (``routers/``) both write one pair per
MoE layer; a layer whose JSON exists is complete. Only safetensors and JSON are read back (no
pickle).
"""

from __future__ import annotations

import json
from typing import Any

from storage.rundir import RunDir, safe_name


def write_layer_files(run: RunDir, directory: str, layer: str, blob: bytes, meta: dict[str, Any]) -> None:
    """Write a layer's safetensors bytes (temp file + rename), then its JSON (last: it marks the layer complete)."""
    run.fs.makedirs(directory, exist_ok=True)
    path = f"{directory}/{safe_name(layer, 'layer')}.safetensors"
    with run.fs.open(path + ".tmp", "wb") as handle:
        handle.write(blob)
    run.fs.mv(path + ".tmp", path)
    run.write_text(f"{directory}/{layer}.json", json.dumps(meta, indent=2))


def read_layer_meta(run: RunDir, directory: str, layer: str) -> dict[str, Any] | None:
    """A layer's JSON, or None when it is missing or damaged (the layer is not complete)."""
    return run.read_json(f"{directory}/{safe_name(layer, 'layer')}.json")


def read_layer_blob(run: RunDir, directory: str, layer: str) -> bytes:
    with run.fs.open(f"{directory}/{safe_name(layer, 'layer')}.safetensors", "rb") as handle:
        return handle.read()


def copy_layer(run: RunDir, source: str, target: str, layer: str) -> None:
    run.fs.makedirs(target, exist_ok=True)
    safe_name(layer, "layer")
    run.fs.copy(f"{source}/{layer}.safetensors", f"{target}/{layer}.safetensors")
    run.fs.copy(f"{source}/{layer}.json", f"{target}/{layer}.json")
