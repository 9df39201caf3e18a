"""A dump killed with SIGKILL mid-way and rerun ends equal to an uninterrupted dump."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

from storage.states import LAYER_ARRAYS, SHARED_ARRAYS, StatesReader
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import run; run()", *args]


def _committed(path) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r").attrs.get("committed_rows", 0))
    except Exception:
        return 0


def _status(run_dir) -> dict:
    out = subprocess.run(_cli("status", str(run_dir), "--json"), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _assert_equal_stores(a, b) -> None:
    ra, rb = StatesReader(str(a)), StatesReader(str(b))
    assert ra.num_rows == rb.num_rows
    for name in SHARED_ARRAYS:
        np.testing.assert_array_equal(ra.read(name), rb.read(name))
    for layer in ra.layers:
        for name in LAYER_ARRAYS:
            np.testing.assert_array_equal(ra.read(name, layer=layer), rb.read(name, layer=layer))


def test_killed_dump_resumes_to_the_same_store(tmp_path, tiny_model, tiny_corpus):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(tiny_run_config(tiny_model, tiny_corpus, batch_tokens=64, chunk_rows=100, max_tokens=8000))
    )
    env = os.environ | {"LPR_DISTILL_QUIET": "1", "PYTHONPATH": os.getcwd()}

    reference = tmp_path / "reference"
    subprocess.run(_cli("dump", str(reference), "--config", str(config)), check=True, env=env)
    total = StatesReader(str(reference / "states.zarr")).num_rows

    crashed = tmp_path / "crashed"
    partial = crashed / "states.zarr.partial"
    kills = 0
    for fraction in (0.15, 0.55):  # two kills at different points, then a clean finish
        proc = subprocess.Popen(_cli("dump", str(crashed), "--config", str(config)), env=env)
        deadline = time.time() + 120
        while _committed(partial) < fraction * total and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the dump finished before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert not _status(crashed)["stages"]["dump"]["complete"]
        assert 0 < _committed(partial) < total
    subprocess.run(_cli("dump", str(crashed), "--config", str(config)), check=True, env=env)
    assert kills == 2 and _status(crashed)["stages"]["dump"]["complete"]
    print(json.dumps({"kill_points": {"dump": kills}}))  # -s shows it; issue 9 counts them across stages
    _assert_equal_stores(reference / "states.zarr", crashed / "states.zarr")
    manifest = json.loads((crashed / "manifests" / "dump.json").read_text())
    assert 0 < manifest["stats"]["resumed_from_row"] < total


def test_a_failed_append_leaves_no_write_in_flight(tmp_path, monkeypatch):
    """One array's write fails while the batch's other writes are still running (a full disk): the
    append raises only once they have all ended, so nothing is left pending on zarr's event loop for
    asyncio to report under the one-line error at exit ("Task was destroyed but it is pending!")."""
    import asyncio
    import errno

    import torch
    import zarr.core.array
    from zarr.core.sync import sync

    from storage.states import StatesWriter, StoreLayout

    layout = StoreLayout(["gate"], [0], 8, 4, 2, "float32", 256, "none")
    writer = StatesWriter.create(str(tmp_path / "s.zarr"), layout=layout, attrs={}, fingerprint="f")
    original = zarr.core.array.AsyncArray.setitem
    finished: list[str] = []

    async def setitem(self, selection, value, **kw):
        if str(self.store_path).endswith("/x"):
            raise OSError(errno.EFBIG, "File too large")
        await asyncio.sleep(0.3)
        await original(self, selection, value, **kw)
        finished.append(str(self.store_path))

    monkeypatch.setattr(zarr.core.array.AsyncArray, "setitem", setitem)
    n = 16
    shared = {"token_id": np.arange(n), "doc_id": np.zeros(n, np.int64), "position": np.arange(n)}
    layer = {
        "x": torch.zeros(n, 8),
        "logits": torch.zeros(n, 4),
        "topk_idx": torch.zeros(n, 2, dtype=torch.int64),
        "topk_w": torch.zeros(n, 2),
    }
    with pytest.raises(OSError, match="File too large"):
        writer.append(shared, [layer], 1)

    async def in_flight() -> int:
        return sum(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    assert sync(in_flight()) == 0
    assert len(finished) == len(writer._arrays) - 1  # every other array's write ran to its end
    assert writer.committed_rows == 0  # and the failed batch is not committed
