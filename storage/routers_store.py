"""The distill stage's output: ``routers/layer_XXX.safetensors`` (router state) + ``layer_XXX.json``.

JSON last: a layer whose JSON exists is complete. Only safetensors and JSON are read back.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load, save

from storage.rundir import RunDir


def write_layer_router(run: RunDir, directory: str, layer: str, state: dict[str, torch.Tensor], meta: dict) -> None:
    run.fs.makedirs(directory, exist_ok=True)
    path = f"{directory}/{layer}.safetensors"
    with run.fs.open(path + ".tmp", "wb") as handle:
        handle.write(save({k: v.detach().contiguous().cpu() for k, v in state.items()}))
    run.fs.mv(path + ".tmp", path)
    run.write_text(f"{directory}/{layer}.json", json.dumps(meta, indent=2))


def read_layer_router(run: RunDir, directory: str, layer: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    text = run.read_text(f"{directory}/{layer}.json")
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    with run.fs.open(f"{directory}/{layer}.safetensors", "rb") as handle:
        return load(handle.read()), meta
