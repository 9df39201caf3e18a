"""Exported routers: ``routers.safetensors`` + ``routers.json`` + ``README.md`` in one directory.

The directory is written under a temporary name (``<out>.partial``) and renamed into place (an
earlier export is renamed away first), so a reader never sees half of it. Only safetensors and
JSON are read back (no pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from storage.errors import LprError

FORMAT = "lpr-distill-routers"
FORMAT_VERSION = 1


def write_routers(out: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str) -> Path:
    """Write the three files into ``out`` (replacing it), atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(plain, str(tmp / "routers.safetensors"))
        (tmp / "routers.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION} | config, indent=2))
        (tmp / "README.md").write_text(card)
        # swap by renames only: ``out`` is at every moment the old export, absent, or the new one —
        # never half deleted (a kill during rmtree(out) would leave a directory that looks complete)
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    except PermissionError:
        raise LprError(f"cannot write {out}", "choose an --out directory you can write to") from None
    return out


def read_routers(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and config of an exported routers directory."""
    directory = Path(directory)
    config_path = directory / "routers.json"
    if not config_path.is_file():
        raise LprError(f"{directory} holds no routers.json", "pass a directory written by `lpr-distill export`")
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise LprError(f"{config_path} is not valid JSON", "export the routers again") from None
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise LprError(f"{directory} is not an lpr-distill routers export of version {FORMAT_VERSION}", "export again")
    try:
        tensors = load_file(str(directory / "routers.safetensors"))
    except (OSError, SafetensorError) as err:
        raise LprError(
            f"{directory / 'routers.safetensors'} is missing or not a valid safetensors file ({err})", "export again"
        ) from None
    return tensors, config
