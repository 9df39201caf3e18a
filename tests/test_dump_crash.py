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
