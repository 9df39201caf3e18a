"""The routers directory (distill stage): per MoE layer, the router's state (torch tensors) + JSON."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load, save

from storage.layer_files import read_layer_blob, read_layer_meta, write_layer_files
from storage.rundir import RunDir


def write_layer_router(run: RunDir, directory: str, layer: str, state: dict[str, torch.Tensor], meta: dict) -> None:
    blob = save({key: value.detach().contiguous().cpu() for key, value in state.items()})
    write_layer_files(run, directory, layer, blob, meta)


def read_layer_router(run: RunDir, directory: str, layer: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A complete layer's state and metadata, or None when the layer is not complete."""
    meta = read_layer_meta(run, directory, layer)
    if meta is None:
        return None
    return load(read_layer_blob(run, directory, layer)), meta
