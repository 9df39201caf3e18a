"""``lpr-distill export`` killed with SIGKILL at random points (seeded), then rerun, ends equal to an
uninterrupted export; after every kill the output directory is either absent or a complete export
equal to the uninterrupted one — never a half-written or half-replaced one that looks complete.

Two kinds of kill points: at a random time across the whole command (start-up included, as a
user's Ctrl-\\ or a preemption would land), and at a random short delay after the command starts
writing (``<out>.partial`` appears), where the window for a torn export is. The second half of the
kills replace an earlier export, which exercises the swap of the old directory for the new one.
The test prints one JSON line with the number of kill points tried (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import clustered_run

pytestmark = pytest.mark.slow

TIMED_KILLS = 8  # at a random time in [0.15, 1.0] × the uninterrupted command's wall time
WRITE_KILLS = 6  # at a random 0–60 ms after <out>.partial appears


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import run; run()", *args]


def _export(run_dir: Path, out: Path) -> list[str]:
    return _cli("export", str(run_dir), "--init-only", "--out", str(out))


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
    subprocess.run(_export(run_dir, reference), check=True, env=env, capture_output=True)
    full_seconds = time.time() - started
    expected = _contents(reference)

    rng = random.Random(9)
    out = tmp_path / "crashed"
    partial = out.with_name(out.name + ".partial")
    kills, outcomes = 0, []
    for attempt in range(TIMED_KILLS + WRITE_KILLS):
        if attempt == TIMED_KILLS and not out.exists():  # the write-time kills replace an earlier export
            subprocess.run(_export(run_dir, out), check=True, env=env, capture_output=True)
        if partial.exists():
            shutil.rmtree(partial)  # so the trigger below sees this attempt's writing start
        process = subprocess.Popen(_export(run_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < TIMED_KILLS:
            time.sleep(rng.uniform(0.15, 1.0) * full_seconds)
        else:
            deadline = time.time() + 10 * full_seconds + 30
            while not partial.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.06))
        if process.poll() is not None:  # finished before the kill: a complete export, not a kill point
            assert process.returncode == 0, process.stderr.read().decode()
            outcomes.append(_assert_absent_or_complete(out, expected))
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        outcomes.append(_assert_absent_or_complete(out, expected))

    subprocess.run(_export(run_dir, out), check=True, env=env, capture_output=True)
    _assert_same(_contents(out), expected)
    assert not partial.exists() and not out.with_name(out.name + ".old").exists()
    print(json.dumps({"kill_points": {"export": kills}, "after_kill": outcomes}))
    assert kills >= TIMED_KILLS + WRITE_KILLS - 3  # nearly every attempt was a real kill
