"""``lpr-distill export`` killed with SIGKILL at random points (seeded), then rerun, ends equal to an
uninterrupted export; after every kill the output directory is either absent or a complete export
equal to the uninterrupted one — never a half-written or half-replaced one that looks complete.

Each kill lands at a random time across the whole command (start-up, reading the states,
calibration, writing, exit — where a preemption would land). The first half write a fresh export;
the second half replace an earlier one, which exercises the swap of the old directory for the new
one (between its renames no export is there, which is allowed; a torn one is not). The test
prints one JSON line with the number of kill points (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import clustered_run

pytestmark = pytest.mark.slow

KILLS = 16  # each at a random time in [0.1, 0.95] × the uninterrupted command's wall time


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import run; run()", *args]


def _export(run_dir: Path, out: Path) -> list[str]:
    return _cli("export", str(run_dir), "--init-only", "--out", str(out))


def _run_ok(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _contents(out: Path) -> dict[str, object]:
    """Everything an export holds, in comparable form (tensors as arrays, JSON parsed, the card as text)."""
    from safetensors.numpy import load_file

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "routers.json", "routers.safetensors"]
    tensors = load_file(str(out / "routers.safetensors"))
    return {
        "tensors": tensors,
        "config": json.loads((out / "routers.json").read_text()),
        "card": (out / "README.md").read_text().replace(str(out), "<out>"),  # the card names its own path
    }


def _assert_same(got: dict[str, object], expected: dict[str, object]) -> None:
    assert got["config"] == expected["config"]
    assert got["card"] == expected["card"]
    assert got["tensors"].keys() == expected["tensors"].keys() and expected["tensors"]
    for key, value in expected["tensors"].items():
        np.testing.assert_array_equal(got["tensors"][key], value, err_msg=key)


def _assert_absent_or_complete(out: Path, expected: dict[str, object]) -> str:
    """After a kill: no export at all, or one equal to the uninterrupted export. Returns which."""
    if not out.exists():
        return "absent"
    _assert_same(_contents(out), expected)
    return "complete"


def test_killed_export_reruns_to_the_same_routers(tmp_path, tiny_model, tiny_corpus):
    _, run = clustered_run(tmp_path / "run", tiny_model, tiny_corpus)
    run_dir = Path(run.root)
    env = os.environ | {"LPR_DISTILL_QUIET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": os.getcwd()}

    reference = tmp_path / "reference"
    started = time.time()
    _run_ok(_export(run_dir, reference), env)
    full_seconds = time.time() - started
    expected = _contents(reference)

    rng = random.Random(9)
    out = tmp_path / "crashed"
    partial = out.with_name(out.name + ".partial")
    kills, outcomes, attempts = {"fresh": 0, "replacing": 0}, [], 0
    while sum(kills.values()) < KILLS:
        attempts += 1
        assert attempts <= 2 * KILLS, outcomes  # the command keeps ending before the kill
        kind = "fresh" if kills["fresh"] < KILLS // 2 else "replacing"
        if kind == "replacing" and not out.exists():
            _run_ok(_export(run_dir, out), env)  # an earlier export for the command to replace
        process = subprocess.Popen(_export(run_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.1, 0.95) * full_seconds)
        if process.poll() is not None:  # finished before the kill: a complete export, not a kill point
            assert process.returncode == 0, process.stderr.read().decode()
            outcomes.append(f"finished ({_assert_absent_or_complete(out, expected)})")
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills[kind] += 1
        outcomes.append(f"{kind}: {_assert_absent_or_complete(out, expected)}")

    _run_ok(_export(run_dir, out), env)
    _assert_same(_contents(out), expected)
    assert not partial.exists() and not out.with_name(out.name + ".old").exists()
    total = sum(kills.values())  # with dump's 2 and at least 1 each for cluster and distill: ≥ 20 in all
    print(json.dumps({"kill_points": {"export": total}, "by_kind": kills, "attempts": attempts, "after": outcomes}))
