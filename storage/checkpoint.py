"""A drop-in checkpoint: the source model's directory with only some tensors' bytes replaced.

``write_checkpoint(source, out, tensors)`` writes ``out`` as a complete checkpoint that stock
``from_pretrained`` (and engines that read the safetensors index) loads: every top-level file of
the source that is not a weight file (config.json, generation_config.json, tokenizer files, chat
template …), the safetensors files the source's index names (or its single ``model.safetensors``),
a ``model.safetensors.index.json`` and a record of what changed. Every tensor not in ``tensors``
keeps its bytes.

How the files are written (measured on transformers 5.25, ext4, 2026-12-07):

* A shard in which no tensor changes is a **hard link** to the source file (a copy where linking
  fails: another file system, no permission). transformers loads hard links and symlinks alike;
  a symlink breaks when the source moves or the directory is copied without following links, a
  hard link does not. (A hard link shares the inode: a tool that rewrites the *source* file in
  place would change the export too; ``link="copy"`` avoids that.)
* A shard that holds a changed tensor is **copied and patched in place**: the new values are cast
  to the stored dtype and written over the old bytes, so the header (names, dtypes, shapes,
  offsets, metadata) and every other byte stay identical. It replaces the original file under the
  same name. An "overlay" shard holding only the new tensors beside the untouched originals loads
  correctly in transformers 5.25 (it reads each key from the file the index names and ignores
  duplicates elsewhere), but vLLM keeps every file the index names and iterates *every* tensor of
  each, so a key in two files would load twice in an order nobody promises: not written.
* The copy is first tried as a copy-on-write clone (``FICLONE``: btrfs, XFS with reflink; not
  measured here), which costs no space; on ext4 (measured) the clone is refused and the bytes are
  copied (``rewrite: "copy"`` in the record). So a rewritten checkpoint costs the size of the shards
  that hold a router: for a model whose every shard holds a layer's router (Qwen3-30B-A3B) that is
  the whole model, though the router tensors themselves are a few MB.

The directory is written under ``<out>.partial`` and renamed at the end: ``out`` never exists
half-written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from storage.errors import LprError, storage_error

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
RECORD = "lpr_checkpoint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FICLONE = 0x40049409  # Linux ioctl: a copy-on-write clone of a whole file


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: ``file`` (a name in the checkpoint directory), [start, end) in it."""

    file: str
    dtype: str  # safetensors dtype code: F32, BF16, …
    shape: tuple[int, ...]
    start: int
    end: int


def read_layout(source: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in ``source``, read from the safetensors headers only (no data)."""
    source = Path(source)
    index = source / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise LprError(f"{index} is not a safetensors index", "pass an intact checkpoint directory") from None
    elif (source / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise LprError(
            f"{source} holds no safetensors weights ({SINGLE} or {INDEX})",
            "re-save the model with save_pretrained (safetensors is its default) and dump from that",
        )
    layout: dict[str, StoredTensor] = {}
    for name in files:
        for key, stored in _header(source / name).items():
            if key in layout:
                raise LprError(f"tensor {key} is stored twice in {source}", "pass an intact checkpoint directory")
            layout[key] = stored
    return layout


def _header(path: Path) -> dict[str, StoredTensor]:
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        raise LprError(f"{path} is missing or not a safetensors file", "pass an intact checkpoint directory") from None
    base = 8 + length  # offsets count from the end of the header
    return {
        key: StoredTensor(path.name, v["dtype"], tuple(v["shape"]), *(base + offset for offset in v["data_offsets"]))
        for key, v in header.items()
        if key != "__metadata__"
    }


def encode(value: torch.Tensor, stored: StoredTensor, key: str) -> tuple[bytes, float]:
    """``value`` as the bytes ``stored`` holds (its dtype and shape), and the largest change the cast made."""
    if stored.dtype not in DTYPES:
        raise LprError(
            f"tensor {key} is stored as {stored.dtype}, which this export does not write",
            "export from a checkpoint whose router tensors are float (F32, BF16, F16, F64)",
        )
    count = (stored.end - stored.start) // DTYPES[stored.dtype].itemsize
    if value.numel() != count:
        raise LprError(
            f"tensor {key} holds {count} values in the checkpoint, the routers give {value.numel()}",
            "export routers made for this checkpoint",
        )
    exact = value.detach().to("cpu", torch.float64).reshape(stored.shape)
    cast = exact.to(DTYPES[stored.dtype]).contiguous()
    error = float((cast.double() - exact).abs().max()) if exact.numel() else 0.0
    assert sys.byteorder == "little"  # safetensors is little-endian, and so is the tensor's memory here
    return cast.view(torch.uint8).numpy().tobytes(), error


def write_checkpoint(
    source: str | Path,
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    record: dict[str, Any],
    *,
    link: Literal["hard", "copy"] = "hard",
) -> dict[str, Any]:
    """Write ``out``: the checkpoint in ``source`` with the tensors named in ``tensors`` (checkpoint
    keys → new values, any float dtype, the stored shape or its number of values) replaced.

    Returns what was written: files linked, copied and rewritten, bytes, the largest cast error.
    """
    source, out = Path(source), Path(out)
    check_target(out)
    layout = read_layout(source)
    unknown = sorted(set(tensors) - set(layout))
    if unknown:
        raise LprError(f"the checkpoint in {source} has no tensor {unknown[0]}", "export routers made for this model")
    patches: dict[str, list[tuple[int, bytes]]] = {}
    changed, cast_error = [], 0.0
    for key, value in tensors.items():
        stored = layout[key]
        data, error = encode(value, stored, key)
        cast_error = max(cast_error, error)
        if data != _read(source / stored.file, stored.start, stored.end):
            patches.setdefault(stored.file, []).append((stored.start, data))
            changed.append(key)
    partial = out.with_name(out.name + ".partial")
    stats: dict[str, Any] = {"linked": [], "copied": [], "rewritten": sorted(patches), "changed": sorted(changed)}
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith(".") and not _is_weights(path.name) and path.name != RECORD:
                shutil.copyfile(path, partial / path.name)
        for name in sorted({stored.file for stored in layout.values()}):
            if name in patches:
                stats["rewrite"] = "reflink" if _clone(source / name, partial / name) else "copy"
                with (partial / name).open("r+b") as handle:
                    for start, data in patches[name]:
                        handle.seek(start)
                        handle.write(data)
            elif link == "hard" and _hard_link(source / name, partial / name):
                stats["linked"].append(name)
            else:
                shutil.copyfile(source / name, partial / name)
                stats["copied"].append(name)
        _write_index(source, partial, layout)
        stats["bytes_rewritten"] = sum((partial / name).stat().st_size for name in patches)
        stats["bytes_linked"] = sum((partial / name).stat().st_size for name in stats["linked"])
        stats["cast_max_abs_error"] = cast_error
        (partial / RECORD).write_text(json.dumps(record | {"files": stats}, indent=2, default=str))
        if out.exists():
            out.rmdir()  # empty (check_target), replaced by the complete directory
        partial.rename(out)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise storage_error(err) or LprError(f"cannot write {out} ({err})", "choose another --checkpoint") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return stats


def check_target(out: Path) -> None:
    """``out`` may be written: absent, or an empty directory."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise LprError(f"--checkpoint {out} exists and is not a directory", "choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise LprError(
            f"--checkpoint {out} exists and is not empty", "choose a new directory, or remove that one first"
        )
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise LprError(f"--checkpoint {out} cannot be written ({ancestor} is not writable)", "choose another directory")


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _read(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


def _hard_link(source: Path, target: Path) -> bool:
    try:
        os.link(source.resolve(), target)
    except OSError:
        return False
    return True


def _clone(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target``: a copy-on-write clone where the file system has one, else bytes."""
    with source.open("rb") as src, target.open("wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return True
        except OSError:
            pass
    shutil.copyfile(source, target)
    return False


def _write_index(source: Path, target: Path, layout: dict[str, StoredTensor]) -> None:
    """The source's index with its weight map (same files), or a new one for a single-file checkpoint."""
    metadata: dict[str, Any] = {}
    if (source / INDEX).is_file():
        metadata = json.loads((source / INDEX).read_text()).get("metadata") or {}
    metadata.setdefault("total_size", sum(s.end - s.start for s in layout.values()))
    weight_map = {key: layout[key].file for key in sorted(layout)}
    (target / INDEX).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
