"""The states store: one Zarr v3 group per run, one subgroup per MoE layer.

::

    states.zarr/                 attrs: model, revision, family, x_dtype, hidden_size, num_experts,
                                        top_k, layers, committed_rows, committed_seqs, complete, ...
      token_id  [N]  int32
      doc_id    [N]  int64      index of the token's document in the corpus
      position  [N]  int32      position of the token in its packed sequence
      layer_000/                attrs: module (e.g. model.layers.0.mlp.gate), layer_index
        x        [N, H]  float16 | float32 | uint16 (bfloat16 bits; x_dtype says so)
        logits   [N, E]  float32
        topk_idx [N, k]  int16 (int32 when E > 32767)
        topk_w   [N, k]  float32

Appends are crash-safe: rows are written first and ``committed_rows`` (with ``committed_seqs``,
the number of packed sequences they came from) is written last, in the root's ``zarr.json``,
which the store replaces atomically. Rows past the committed count are garbage to overwrite.
Arrays grow geometrically; ``finish`` trims them to the committed count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.core.sync import sync

from storage.errors import LprError
from storage.rundir import safe_name

FORMAT_VERSION = 1
SHARED_ARRAYS = {"token_id": np.int32, "doc_id": np.int64, "position": np.int32}
LAYER_ARRAYS = ("x", "logits", "topk_idx", "topk_w")
_X_STORAGE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_MAX_CHUNK_BYTES = 64 * 2**20
# attributes StatesWriter.create and its appends set themselves (the rest came from the caller)
_STORE_ATTRS = {"format_version", "layers", "layer_modules", "hidden_size", "num_experts", "top_k", "x_dtype"}
_STORE_ATTRS |= {"chunk_rows", "codec", "fingerprint", "committed_rows", "committed_seqs", "complete"}


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and names of a new store."""

    layer_modules: list[str]  # module name of each MoE layer's router, in model order
    layer_indices: list[int]  # decoder-layer index of each
    hidden_size: int
    num_experts: int
    top_k: int
    x_dtype: str  # logical dtype of x: float16 | bfloat16 | float32
    chunk_rows: int
    codec: str  # none | lz4 | zstd

    @property
    def layer_names(self) -> list[str]:
        return [f"layer_{i:03d}" for i in self.layer_indices]


def _compressors(codec: str) -> Any:
    if codec == "none":
        return None
    if codec == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle=zarr.codecs.BloscShuffle.shuffle)
    return zarr.codecs.ZstdCodec(level=1)


def _open_group(url: str, mode: str, storage_options: dict[str, Any] | None) -> zarr.Group:
    options = storage_options if "://" in url and not url.startswith("file://") else None
    try:
        return zarr.open_group(store=url, mode=mode, storage_options=options, zarr_format=3)
    except FileNotFoundError:
        raise LprError(f"no states store at {url}", "run `lpr-distill dump RUN_DIR` first") from None
    except PermissionError:
        raise LprError(f"cannot write the states store at {url}", "check the run directory's permissions") from None


async def _gather_settled(*awaitables: Any, timeout: float = 60.0) -> list[Any]:
    """``asyncio.gather`` on zarr's event loop that, when one awaitable fails, first waits (up to
    ``timeout`` s) until every other task on the loop is done, then raises.

    When one chunk write fails (a full disk), the gathers — this one and zarr's own — raise at once
    and leave the rest of the batch's I/O running; still pending when the process exits, each was
    reported by asyncio under the one-line error ("Task was destroyed but it is pending!", seen once
    in CI). Settled here, they end (or fail, their errors retrieved by the gathers) before the error
    travels on.
    """
    try:
        return await asyncio.gather(*awaitables)
    except BaseException:
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
        if others:
            await asyncio.wait(others, timeout=timeout)
        raise


def to_torch(array: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Rows read from ``x`` as a tensor of their logical dtype (bfloat16 is stored as its uint16 bits)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if logical_dtype == "bfloat16" else tensor


def _x_storage(x: torch.Tensor, logical_dtype: str) -> np.ndarray:
    x = x.detach().to("cpu")
    if logical_dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    return x.to(getattr(torch, logical_dtype)).numpy()


class StatesWriter:
    """Appends batches of rows to a (new or resumed) states store."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.attrs = dict(group.attrs)
        self.layers = list(self.attrs["layers"])
        keys = list(SHARED_ARRAYS) + [f"{layer}/{name}" for layer in self.layers for name in LAYER_ARRAYS]
        # Rows are never all zero: skip zarr's per-chunk "is it empty?" scan (a third of the write CPU, measured).
        self._arrays = {key: group[key].with_config({"write_empty_chunks": True}) for key in keys}

    @classmethod
    def resume(
        cls, url: str, *, fingerprint: str, storage_options: dict[str, Any] | None = None
    ) -> StatesWriter | None:
        """The unfinished store at ``url`` if it was started with the same ``fingerprint``, else None."""
        try:
            group = _open_group(url, "r+", storage_options)
        except (LprError, FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return None
        attrs = group.attrs
        if (
            attrs.get("fingerprint") != fingerprint
            or attrs.get("complete")
            or attrs.get("format_version") != FORMAT_VERSION
        ):
            return None
        return cls(group)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        layout: StoreLayout,
        attrs: dict[str, Any],
        fingerprint: str,
        storage_options: dict[str, Any] | None = None,
    ) -> StatesWriter:
        """A new, empty store at ``url`` (anything there before is replaced)."""
        group = _open_group(url, "w", storage_options)
        x_item = np.dtype(_X_STORAGE[layout.x_dtype]).itemsize
        rows = max(256, min(layout.chunk_rows, _MAX_CHUNK_BYTES // (layout.hidden_size * x_item)))
        compressors = _compressors(layout.codec)
        idx_dtype = np.int16 if layout.num_experts <= np.iinfo(np.int16).max else np.int32

        def add_array(parent: zarr.Group, name: str, width: int | None, dtype: Any) -> None:
            shape = (0,) if width is None else (0, width)
            chunks = (rows,) if width is None else (rows, width)
            parent.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
            )

        for name, dtype in SHARED_ARRAYS.items():
            add_array(group, name, None, dtype)
        for name, module, index in zip(layout.layer_names, layout.layer_modules, layout.layer_indices, strict=True):
            sub = group.create_group(name, attributes={"module": module, "layer_index": index})
            add_array(sub, "x", layout.hidden_size, _X_STORAGE[layout.x_dtype])
            add_array(sub, "logits", layout.num_experts, np.float32)
            add_array(sub, "topk_idx", layout.top_k, idx_dtype)
            add_array(sub, "topk_w", layout.top_k, np.float32)
        group.attrs.update(
            attrs
            | {
                "format_version": FORMAT_VERSION,
                "layers": layout.layer_names,
                "layer_modules": layout.layer_modules,
                "hidden_size": layout.hidden_size,
                "num_experts": layout.num_experts,
                "top_k": layout.top_k,
                "x_dtype": layout.x_dtype,
                "chunk_rows": rows,
                "codec": layout.codec,
                "fingerprint": fingerprint,
                "committed_rows": 0,
                "committed_seqs": 0,
                "complete": False,
            }
        )
        return cls(group)

    @property
    def committed_rows(self) -> int:
        return int(self.attrs["committed_rows"])

    @property
    def committed_seqs(self) -> int:
        return int(self.attrs["committed_seqs"])

    def append(self, shared: dict[str, np.ndarray], layers: list[dict[str, Any]], n_seqs: int) -> None:
        """Write one batch of ``n`` rows, then commit it.

        shared: token_id/doc_id/position, each (n,). layers: per layer, x (n, H) tensor,
        logits (n, E), topk_idx (n, k), topk_w (n, k) tensors, in the store's layer order.
        """
        values: dict[str, np.ndarray] = {name: np.asarray(shared[name]) for name in SHARED_ARRAYS}
        for layer, data in zip(self.layers, layers, strict=True):
            values[f"{layer}/x"] = _x_storage(data["x"], self.attrs["x_dtype"])
            values[f"{layer}/logits"] = data["logits"].detach().float().cpu().numpy()
            values[f"{layer}/topk_idx"] = data["topk_idx"].detach().cpu().numpy()
            values[f"{layer}/topk_w"] = data["topk_w"].detach().float().cpu().numpy()
        self.append_rows(values, n_seqs)

    def append_rows(self, values: dict[str, np.ndarray], n_seqs: int) -> None:
        """Write ``n`` rows already in storage form, then commit them.

        values: one (n,) or (n, width) array per key of the store (``token_id``, ``layer_000/x``, …),
        x as stored (bfloat16 as its uint16 bits): what a merge reads from another store of this layout.
        """
        start = self.committed_rows
        stop = start + len(values["token_id"])
        sync(self._write_rows(start, stop, values))
        self._set_attrs(committed_rows=stop, committed_seqs=self.committed_seqs + n_seqs)

    async def _write_rows(self, start: int, stop: int, values: dict[str, np.ndarray]) -> None:
        """Grow and fill every array concurrently: one round trip, not one per array."""

        async def write(key: str, array: zarr.Array) -> None:
            target = array._async_array
            if target.shape[0] < stop:  # grow geometrically: O(log N) metadata rewrites, not one per batch
                chunk = target.chunks[0]
                capacity = -(-max(stop, 2 * target.shape[0]) // chunk) * chunk
                await target.resize((capacity, *target.shape[1:]))  # in place
            await target.setitem(slice(start, stop), values[key].astype(array.dtype, copy=False))

        await _gather_settled(*(write(key, array) for key, array in self._arrays.items()))

    def adopt_rows(self, rows: int, n_seqs: int, place_chunks: Callable[[], None]) -> None:
        """Commit ``rows`` rows whose chunk files ``place_chunks`` puts in place (a merge that links
        or copies whole chunks instead of rewriting them): shapes first, then the chunks, then the count."""
        self._resize(rows)
        place_chunks()
        self._set_attrs(committed_rows=rows, committed_seqs=n_seqs)

    def finish(self, extra: dict[str, Any]) -> None:
        """Trim every array to the committed rows and mark the store complete."""
        self._resize(self.committed_rows)
        self._set_attrs(complete=True, **extra)

    def _resize(self, rows: int) -> None:
        for array in self._arrays.values():
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))

    def _set_attrs(self, **values: Any) -> None:
        self.attrs.update(values)
        self.group.update_attributes(values)  # one atomic write of the root zarr.json


class StatesReader:
    """Read access to a complete (or in-progress) states store."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.group = _open_group(url, "r", storage_options)
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise LprError(f"{url} is not a states store of this version", "rerun `lpr-distill dump RUN_DIR --force`")
        # layer names become file names downstream (prototypes/<layer>.safetensors): plain names only
        self.layers: list[str] = [safe_name(layer, "layer") for layer in self.attrs["layers"]]

    @property
    def num_rows(self) -> int:
        return int(self.attrs["committed_rows"])

    def read(self, name: str, start: int = 0, stop: int | None = None, *, layer: str | None = None) -> np.ndarray:
        """Committed rows ``[start, stop)`` of a shared array, or of a layer's array when ``layer`` is given."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        key = f"{layer}/{name}" if layer else name
        try:
            return self.group[key][start:stop]
        except Exception as err:  # a truncated or overwritten chunk file fails to decode or reshape
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LprError(
                f"the states store {self.url} is damaged: {key} rows {start:,}–{stop:,} cannot be read ({first})",
                "dump again with `lpr-distill dump RUN_DIR --force`",
            ) from err

    def read_x(self, layer: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Router inputs (rows, H) as a tensor of their logical dtype."""
        return to_torch(self.read("x", start, stop, layer=layer), self.attrs["x_dtype"])

    def layer_module(self, layer: str) -> str:
        return str(self.group[layer].attrs["module"])

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk of the layer arrays (reads aligned to it touch no chunk twice)."""
        return int(self.group[f"{self.layers[0]}/x"].chunks[0])

    def layout(self) -> StoreLayout:
        """The layout this store was created with (a store made from it has the same arrays and chunks)."""
        a = self.attrs
        indices = [int(self.group[layer].attrs["layer_index"]) for layer in self.layers]
        return StoreLayout(
            layer_modules=list(a["layer_modules"]),
            layer_indices=indices,
            hidden_size=int(a["hidden_size"]),
            num_experts=int(a["num_experts"]),
            top_k=int(a["top_k"]),
            x_dtype=str(a["x_dtype"]),
            chunk_rows=int(a["chunk_rows"]),
            codec=str(a["codec"]),
        )

    def own_attrs(self) -> dict[str, Any]:
        """The attributes its writer was given (model, corpus, …), without the ones the store keeps itself."""
        return {key: value for key, value in self.attrs.items() if key not in _STORE_ATTRS}

    def array_keys(self) -> list[str]:
        return list(SHARED_ARRAYS) + [f"{layer}/{name}" for layer in self.layers for name in LAYER_ARRAYS]

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of every array, keyed as ``StatesWriter.append_rows`` takes them,
        read concurrently (one round trip on object storage, not one per array)."""
        keys = self.array_keys()
        arrays = [self.group[key]._async_array for key in keys]  # opened here: not on zarr's loop

        async def read_all() -> list[Any]:
            return await _gather_settled(*(array.getitem(slice(start, stop)) for array in arrays))

        try:
            return dict(zip(keys, sync(read_all()), strict=True))
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LprError(
                f"the states store {self.url} is damaged: rows {start:,}–{stop:,} cannot be read ({first})",
                "dump it again with --force",
            ) from err
