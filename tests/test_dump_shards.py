"""Sharded dump: concurrent workers into one store (local and s3:// on a real moto server), a killed
worker resumed, the merge equal to the single-process dump row for row, and bad shard input.

Workers are real `lpr-distill dump RUN --shard I/N` processes running at the same time; the
reference is the single-process `lpr-distill dump` of the same config (also a subprocess, so both
sides compute with the same thread settings).
"""

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

from pipeline.cli.status import run_status
from pipeline.config import build_config
from pipeline.errors import LprError
from pipeline.stages.dump import run_dump
from pipeline.stages.dump_merge import batch_bounds
from pipeline.stages.dump_shards import ShardSpec, run_dump_shard
from storage.rundir import RunDir
from storage.shards import SHARDS_DIR, shard_states
from storage.states import LAYER_ARRAYS, SHARED_ARRAYS, StatesReader
from tests.conftest import tiny_run_config
from tests.prefect_server import free_port

# 2 sequences of 32 tokens per batch: 63 batches, so a worker can be killed mid-way
SUBPROCESS_DUMP = {"batch_tokens": 64, "chunk_rows": 256, "max_tokens": 4000}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import run; run()", *args]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: the workers share the cores (and compute as the reference process does)
    return os.environ | {"LPR_DISTILL_QUIET": "1", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"} | extra


def assert_same_store(a: StatesReader, b: StatesReader) -> None:
    """Every array equal row for row, and the same root attributes (fingerprint included)."""
    assert a.num_rows == b.num_rows > 0
    for name in SHARED_ARRAYS:
        np.testing.assert_array_equal(a.read(name), b.read(name))
    assert a.layers == b.layers
    for layer in a.layers:
        for name in LAYER_ARRAYS:
            np.testing.assert_array_equal(a.read(name, layer=layer), b.read(name, layer=layer))
        assert a.group[f"{layer}/x"].chunks == b.group[f"{layer}/x"].chunks
    assert a.attrs == b.attrs


def token_keys(store: StatesReader) -> np.ndarray:
    """(doc_id, offset of the token in its document) per row, (rows, 2) int64.

    ``position`` counts within a packed sequence and a document spans sequences, so (doc_id,
    position) repeats; the offset in the document (stream position − the document's first) does not.
    """
    docs, positions = store.read("doc_id"), store.read("position").astype(np.int64)
    stream = (np.cumsum(positions == 0) - 1) * int(store.attrs["seq_len"]) + positions
    first = np.full(int(docs.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, docs, stream)
    return np.stack([docs, stream - first[docs]], 1)


def assert_every_token_once(store: StatesReader, reference: StatesReader) -> None:
    """The issue's bar: token keys unique, as many as the single-process dump's and the same ones,
    and every document with exactly its tokens (none lost, none twice)."""
    keys, ref_keys = token_keys(store), token_keys(reference)
    assert len(np.unique(keys, axis=0)) == len(keys) == reference.num_rows
    np.testing.assert_array_equal(np.unique(keys, axis=0), np.unique(ref_keys, axis=0))
    np.testing.assert_array_equal(np.bincount(store.read("doc_id")), np.bincount(reference.read("doc_id")))


# --- fast, in one process ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3/2", r"--shard 3/2: the shard index I=3 should be in 0 … 1"),
        ("2/2", r"--shard 2/2: the shard index I=2 should be in 0 … 1"),
        ("-1/2", r"the shard index I=-1 should be in 0 … 1"),
        ("0/0", r"--shard 0/0: the shard count N=0 should be ≥ 1"),
        ("2", r"--shard '2' should be I/N, e.g. 0/2"),
        ("a/b", r"--shard 'a/b' should be I/N"),
    ],
)
def test_bad_shard_spec_is_one_error(spec, message):
    with pytest.raises(LprError, match=message):
        ShardSpec.parse(spec)


def test_good_shard_spec():
    assert ShardSpec.parse(" 1 / 3 ") == ShardSpec(1, 3) and str(ShardSpec(1, 3)) == "1/3"


def test_batch_bounds_against_a_loop():
    rng = np.random.default_rng(0)
    lengths = [32] * 9 + [int(rng.integers(1, 32))]  # full sequences, then a short last one
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    for per_batch in (1, 3, 4, 10, 12):
        bounds, seqs = batch_bounds(positions, per_batch)
        expected, rows, n = [0], 0, []
        for first in range(0, len(lengths), per_batch):
            rows += sum(lengths[first : first + per_batch])
            expected.append(rows)
            n.append(len(lengths[first : first + per_batch]))
        assert bounds.tolist() == expected and seqs.tolist() == n


def _config(tiny_model, tiny_corpus, **dump):
    return build_config(tiny_run_config(tiny_model, tiny_corpus, max_tokens=1500, **dump))


@pytest.mark.parametrize(
    ("layout", "mode"),
    [
        ({"batch_tokens": 128, "chunk_rows": 256}, "rewrite"),  # two batches per chunk: rows are rewritten
        ({"batch_tokens": 256, "chunk_rows": 256}, "link"),  # a batch is a chunk: chunk files are hard-linked
    ],
)
def test_shards_one_after_another_merge_to_the_single_process_store(tmp_path, tiny_model, tiny_corpus, layout, mode):
    single = RunDir(str(tmp_path / "single"))
    single.ensure()
    reference = run_dump(cfg=_config(tiny_model, tiny_corpus, **layout), run=single)

    cfg = _config(tiny_model, tiny_corpus, shards=3, **layout)
    run = RunDir(str(tmp_path / "sharded"))
    run.ensure()
    for index in (2, 0):  # any order
        assert run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(index, 3))["rows"] > 0
    with pytest.raises(LprError, match=r"is not complete: shard 1/3 \(not started\)"):
        run_dump(cfg=cfg, run=run)
    assert not run_status(run)["stages"]["dump"]["complete"]
    assert run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(2, 3))["already_complete"]
    run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(1, 3))
    assert not run_status(run)["stages"]["dump"]["complete"]  # complete shards, no merge yet
    merged = run_dump(cfg=cfg, run=run)

    assert run_status(run)["stages"]["dump"]["complete"]
    assert merged.fingerprint == reference.fingerprint and merged.config == reference.config
    assert merged.stats["shards"] == 3 and merged.outputs["rows"] == reference.outputs["rows"]
    assert merged.stats["merge"] == mode
    assert sum(merged.stats["shard_rows"]) == reference.outputs["rows"]
    assert not run.fs.exists(run.path(SHARDS_DIR))  # shard stores go once the merge is committed
    a = StatesReader(run.url_of(run.output_path("dump")))
    b = StatesReader(single.url_of(single.output_path("dump")))
    assert_same_store(a, b)
    assert_every_token_once(a, b)
    assert run_dump(cfg=cfg, run=run).skipped
    assert run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(0, 3))["skipped"]


def test_an_interrupted_merge_resumes(tmp_path, tiny_model, tiny_corpus, monkeypatch):
    """The merge stops after two commits (a fault in its third write); the rerun continues from the
    committed rows and ends with the single-process store."""
    from storage.states import StatesWriter

    single = RunDir(str(tmp_path / "single"))
    single.ensure()
    run_dump(cfg=_config(tiny_model, tiny_corpus, chunk_rows=256, batch_tokens=64), run=single)
    cfg = _config(tiny_model, tiny_corpus, chunk_rows=256, batch_tokens=64, shards=2)
    run = RunDir(str(tmp_path / "sharded"))
    run.ensure()
    for index in (0, 1):
        run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(index, 2))
    real, calls = StatesWriter.append_rows, []

    def failing(self, values, n_seqs):
        calls.append(n_seqs)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, values, n_seqs)

    monkeypatch.setattr(StatesWriter, "append_rows", failing)
    with pytest.raises(OSError):
        run_dump(cfg=cfg, run=run)
    monkeypatch.setattr(StatesWriter, "append_rows", real)
    assert not run_status(run)["stages"]["dump"]["complete"]
    assert StatesReader(run.url_of(run.partial_path("dump"))).num_rows == 2 * 256  # two chunks of 4 × 64 rows
    merged = run_dump(cfg=cfg, run=run)
    assert merged.stats["resumed_from_row"] == 512
    assert_same_store(
        StatesReader(run.url_of(run.output_path("dump"))), StatesReader(single.url_of(single.output_path("dump")))
    )


def test_an_interrupted_chunk_link_merge_is_redone(tmp_path, tiny_model, tiny_corpus, monkeypatch):
    """The link merge stops after 10 of its chunk files; the shard stores are intact, the rerun places
    every chunk again and ends with the single-process store."""
    import storage.shards

    layout = {"batch_tokens": 256, "chunk_rows": 256}
    single = RunDir(str(tmp_path / "single"))
    single.ensure()
    run_dump(cfg=_config(tiny_model, tiny_corpus, **layout), run=single)
    cfg = _config(tiny_model, tiny_corpus, shards=2, **layout)
    run = RunDir(str(tmp_path / "sharded"))
    run.ensure()
    for index in (0, 1):
        run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(index, 2))
    real, calls = os.link, []

    def failing(src, dst, **kwargs):  # zarr links its own temp files too: count only the shard chunks
        if SHARDS_DIR in str(src):
            calls.append(dst)
            if len(calls) > 10:
                raise RuntimeError("killed")
        real(src, dst, **kwargs)

    monkeypatch.setattr(storage.shards.os, "link", failing)
    with pytest.raises(RuntimeError):
        run_dump(cfg=cfg, run=run)
    monkeypatch.setattr(storage.shards.os, "link", real)
    assert not run_status(run)["stages"]["dump"]["complete"]
    assert StatesReader(run.url_of(run.partial_path("dump"))).num_rows == 0  # nothing committed yet
    assert run_dump(cfg=cfg, run=run).stats["merge"] == "link"
    assert_same_store(
        StatesReader(run.url_of(run.output_path("dump"))), StatesReader(single.url_of(single.output_path("dump")))
    )


def test_a_different_shard_count_is_refused(tmp_path, tiny_model, tiny_corpus):
    run = RunDir(str(tmp_path / "run"))
    run.ensure()
    run_dump_shard(cfg=_config(tiny_model, tiny_corpus, shards=2), run=run, shard=ShardSpec(0, 2))
    three = _config(tiny_model, tiny_corpus, shards=3)
    with pytest.raises(LprError, match=r"is sharded 2 ways \(shard 0/2\), but --shard 1/3 asks for 3"):
        run_dump_shard(cfg=three, run=run, shard=ShardSpec(1, 3))
    assert sorted(p.rsplit("/", 1)[-1] for p in run.fs.ls(run.path(SHARDS_DIR))) == ["0_of_2"]  # left as it was
    with pytest.raises(LprError, match=r"--shard 1/3 does not match dump.shards=2"):
        run_dump_shard(cfg=_config(tiny_model, tiny_corpus, shards=2), run=run, shard=ShardSpec(1, 3))
    run_dump_shard(cfg=three, run=run, shard=ShardSpec(1, 3), force=True)  # --force discards the 2-way shards
    assert sorted(p.rsplit("/", 1)[-1] for p in run.fs.ls(run.path(SHARDS_DIR))) == ["1_of_3"]


def test_too_many_shards_for_the_stream(tmp_path, tiny_model, tiny_corpus):
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus, max_tokens=64, batch_tokens=64, shards=3))
    run = RunDir(str(tmp_path / "run"))
    run.ensure()
    with pytest.raises(LprError, match=r"shard 2/3 has no rows: the train split makes only 1 batch"):
        run_dump_shard(cfg=cfg, run=run, shard=ShardSpec(2, 3))


def test_cli_bad_shard_is_one_line_and_writes_nothing(tmp_path):
    for spec in ("3/2", "0/0"):
        run_dir = tmp_path / f"run-{spec.replace('/', '-')}"
        proc = subprocess.run(_cli("dump", str(run_dir), "--shard", spec), capture_output=True, text=True, env=_env())
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --shard") and "Traceback" not in proc.stderr
        assert not run_dir.exists()


# --- concurrent worker processes -------------------------------------------------------------------


def _config_file(tmp_path_factory, tiny_model, tiny_corpus, **dump):
    path = tmp_path_factory.mktemp("shard-config") / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tiny_model, tiny_corpus, **SUBPROCESS_DUMP | dump)))
    return path


def _reference(tmp_path_factory, config_file) -> StatesReader:
    """The single-process dump of the same config, by the CLI in its own process."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_cli("dump", str(run_dir), "--config", str(config_file)), check=True, env=_env())
    return StatesReader(str(run_dir / "states.zarr"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model, tiny_corpus):
    return _config_file(tmp_path_factory, tiny_model, tiny_corpus)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file) -> StatesReader:
    return _reference(tmp_path_factory, config_file)


def _workers(run_dir: str, config_file, count: int, env: dict[str, str]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            _cli("dump", run_dir, "--config", str(config_file), "--shard", f"{index}/{count}"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(count)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        outs.append(stdout)
    return outs


def _watch(run: RunDir, procs: list[subprocess.Popen]) -> bool:
    """Poll the shard stores until the workers end; True when every shard had rows committed while
    none was complete yet (the workers really wrote into the store at the same time).

    On 2 cores one worker can load its model late and start writing after another finished, so a
    worker caught mid-write is paused (SIGSTOP) until every worker has been caught mid-write, then
    all go on: the overlap is then certain, not a matter of scheduling luck."""
    together = False
    paused: set[int] = set()
    try:
        while any(proc.poll() is None for proc in procs):
            states = {s.index: s for s in shard_states(run) if s.count == len(procs)}
            for index, proc in enumerate(procs):
                state = states.get(index)
                if index not in paused and state is not None and state.rows > 0 and not state.complete:
                    proc.send_signal(signal.SIGSTOP)
                    paused.add(index)
            if len(paused) == len(procs) and not together:
                states = {s.index: s for s in shard_states(run) if s.count == len(procs)}
                together = all(s.rows > 0 and not s.complete for s in states.values()) and len(states) == len(procs)
                for proc in procs:
                    proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
    return together


@pytest.mark.slow
def test_three_concurrent_workers_into_one_local_store(tmp_path, config_file, reference):
    run_dir = str(tmp_path / "run")
    started = time.perf_counter()
    procs = _workers(run_dir, config_file, 3, _env())
    assert _watch(RunDir(run_dir), procs), "the workers did not write at the same time"
    outs = _finish(procs)
    workers_s = time.perf_counter() - started
    assert all("complete" in out for out in outs)
    assert not run_status(RunDir(run_dir))["stages"]["dump"]["complete"]
    started = time.perf_counter()
    subprocess.run(_cli("dump", run_dir), check=True, env=_env())  # shards=3 comes from the saved config.yaml
    merge_cli_s = time.perf_counter() - started
    run = RunDir(run_dir)
    assert run_status(run)["stages"]["dump"]["complete"]
    merged = StatesReader(run_dir + "/states.zarr")
    assert_every_token_once(merged, reference)
    assert_same_store(merged, reference)
    stats = run.read_manifest("dump").stats
    print(
        json.dumps(
            {
                "bench": "dump_shards",
                "workers": 3,
                "rows": merged.num_rows,
                "workers_wall_s": round(workers_s, 2),
                "merge_cli_wall_s": round(merge_cli_s, 2),
                "merge_s": stats["merge_seconds"],
                "merge_rows_per_s": stats["merge_rows_per_second"],
            }
        )
    )


def _shard_rows(path) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r").attrs.get("committed_rows", 0))
    except Exception:
        return 0


@pytest.mark.slow
def test_a_killed_worker_resumes_and_the_store_equals_the_single_process_one(tmp_path, config_file, reference):
    run_dir = str(tmp_path / "run")
    victim_store = tmp_path / "run" / SHARDS_DIR / "1_of_2"
    procs = _workers(run_dir, config_file, 2, _env())
    deadline = time.time() + 120
    while _shard_rows(victim_store) < 0.2 * reference.num_rows / 2 and time.time() < deadline:
        assert procs[1].poll() is None, "worker 1 finished before it could be killed; make the dump longer"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    killed_at = _shard_rows(victim_store)
    assert 0 < killed_at < reference.num_rows / 2
    _finish(procs[:1])

    run = RunDir(run_dir)
    assert not run_status(run)["stages"]["dump"]["complete"]
    merge = subprocess.run(_cli("dump", run_dir), capture_output=True, text=True, env=_env())
    assert merge.returncode == 2 and len(merge.stderr.strip().splitlines()) == 1
    assert "is not complete: shard 1/2 (" in merge.stderr and "rows so far)" in merge.stderr
    assert not run_status(run)["stages"]["dump"]["complete"]

    rerun = subprocess.run(
        _cli("dump", run_dir, "--shard", "1/2"), capture_output=True, text=True, env=_env(), check=True
    )  # worker 1 again (its config from the run's config.yaml)
    assert "resumed at row" in rerun.stdout
    data = yaml.safe_load(config_file.read_text())
    data["dump"]["shards"] = 2
    assert run_dump(cfg=build_config(data), run=run).stats["shards"] == 2  # the merge, in this process
    assert run_status(run)["stages"]["dump"]["complete"]
    merged = StatesReader(run_dir + "/states.zarr")
    assert_every_token_once(merged, reference)
    assert_same_store(merged, reference)
    print(json.dumps({"kill_points": {"dump_shard": 1}, "killed_at_row": killed_at}))


@pytest.fixture(scope="module")
def s3_env():
    """A real S3-compatible server (moto, threaded, in this process) on 127.0.0.1 with a bucket;
    the environment that points worker processes at it."""
    server_mod = pytest.importorskip("moto.server", reason="install the dev extras: pip install -e '.[dev]'")
    s3fs = pytest.importorskip("s3fs")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    options = {"key": "test", "secret": "test"}
    options["client_kwargs"] = {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "eu-west-1"}
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("lpr-shards")
    yield env, options
    server.stop()


@pytest.mark.slow
@pytest.mark.server
def test_two_concurrent_workers_into_one_s3_store(tmp_path_factory, tiny_model, tiny_corpus, s3_env):
    """A batch is a chunk here (256 rows), so the merge is server-side copies of the shards' chunks."""
    env, options = s3_env
    config_file = _config_file(tmp_path_factory, tiny_model, tiny_corpus, batch_tokens=256, chunk_rows=256)
    reference = _reference(tmp_path_factory, config_file)
    run_dir = "s3://lpr-shards/run"
    run = RunDir(run_dir, storage_options=options)
    procs = _workers(run_dir, config_file, 2, _env(**env))
    assert _watch(run, procs), "the workers did not write at the same time"
    _finish(procs)
    assert run.fs.exists(f"lpr-shards/run/{SHARDS_DIR}/0_of_2/zarr.json")
    assert not run_status(run)["stages"]["dump"]["complete"]
    subprocess.run(_cli("dump", run_dir), check=True, env=_env(**env))
    assert run_status(run)["stages"]["dump"]["complete"]
    assert run.read_manifest("dump").stats["merge"] == "server-side copy"
    run.fs.invalidate_cache()  # this process listed the shards while the workers wrote
    assert not run.fs.find(f"lpr-shards/run/{SHARDS_DIR}")
    merged = StatesReader(run_dir + "/states.zarr", options)
    assert_every_token_once(merged, reference)
    assert_same_store(merged, reference)
