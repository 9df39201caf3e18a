"""The lpr_distill flow on a real Prefect server started by this test session.

A served deployment with a cron schedule runs the (shrunk) demo when triggered through the API,
one task run per layer for cluster and distill, and a second run skips every stage; the deploy
command puts a cron deployment in a process work pool. In-process flows on the tiny model: the
fanned-out run leaves exactly the CLI's files and manifests, on threads and on a 2-worker Dask
cluster, on local disk and on a real S3-compatible server (moto); a layer that fails leaves nothing
complete-looking and a rerun resumes without redoing the finished layer.

Prefect is imported inside the tests, after the server fixture has set PREFECT_API_URL/PREFECT_HOME
(Prefect reads its settings when it is imported).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import DistillConfig
from tests.conftest import tiny_run_config
from tests.prefect_server import free_port, stop_group, wait_for_deployment

pytestmark = [pytest.mark.server, pytest.mark.slow]
pytest.importorskip("prefect_dask", reason="install the dask extra: pip install -e '.[dask]'")

# The demo (model.path/corpus.source "demo"), shrunk so that building the model and running every
# stage takes seconds: the same code path as `lpr-distill demo`, at a size CI can afford.
SMALL_DEMO: dict[str, Any] = {
    "model": {"path": "demo"},
    "corpus": {"source": "demo", "seq_len": 32, "demo_max_chars": 200_000},
    "demo": {
        "hidden_size": 32,
        "num_layers": 4,
        "num_experts": 4,
        "top_k": 2,
        "expert_width": 32,
        "num_heads": 2,
        "vocab_size": 300,
        "corpus_chars": 200_000,
        "seq_len": 32,
        "batch_size": 4,
        "train_steps": 5,
        "eval_sequences": 4,
    },
    "dump": {"max_tokens": 2048, "batch_tokens": 256},
}
# Small stage settings shared by the demo and the tiny-model runs.
SMALL_STAGES: dict[str, Any] = {
    "cluster": {"latent_dim": 8, "iterations": 3},
    "router": {"calibration_rows": 512},
    "distill": {"steps": 40, "batch_rows": 64, "val_rows": 64, "eval_every": 20}
    | (  # the model-level phase, where this checkout has it: two steps
        {"model_steps": 2, "model_batch_sequences": 2, "model_val_sequences": 2, "calibration_sequences": 4}
        if "model_steps" in DistillConfig.model_fields
        else {}
    ),
    "validate": {"tasks": [], "sequences": 4, "batch_size": 4, "bias_strengths": [0.0, 1.0]},
    "flow": {"retries": 1, "retry_delay_seconds": 0},
}
VOLATILE = {"started_at", "finished_at", "bytes", "run"}  # and timings (keys ending in seconds / per_second)


def _timing(**figures: float) -> None:
    """One JSON line per measured figure set (visible with pytest -s; the report quotes them)."""
    print(json.dumps({"bench": "flows", **{k: round(v, 2) for k, v in figures.items()}}))


def _cfg(model: Path, corpus: Path, **sections: Any):
    from pipeline.config import build_config

    # 1,024 rows in chunks of 512: few objects per array, so the S3 run is not all round trips
    dump = tiny_run_config(model, corpus, max_tokens=1024, batch_tokens=512, chunk_rows=512)
    return build_config(dump | SMALL_STAGES | sections)


async def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


async def _artifacts(flow_run_id) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact.data for artifact in found}


def _comparable(value: Any) -> Any:
    """JSON data without timings and run URLs (what must be equal between two runs of one config)."""
    if isinstance(value, dict):
        return {
            k: _comparable(v)
            for k, v in value.items()
            if k not in VOLATILE and not k.endswith(("seconds", "per_second"))
        }
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def assert_same_run(a, b, *, own_stats: tuple[str, ...] = ()) -> None:
    """Two run directories hold the same manifests and per-layer outputs: tensors bitwise, JSON up to timings
    (and up to the stats of the stages in ``own_stats``, which the two runs did differently)."""
    from pipeline.stages.registry import STAGE_FUNCTIONS

    for stage in STAGE_FUNCTIONS:
        ma, mb = a.read_manifest(stage), b.read_manifest(stage)
        assert ma is not None and mb is not None, stage
        assert (ma.fingerprint, ma.config, ma.inputs) == (mb.fingerprint, mb.config, mb.inputs), stage
        assert _comparable(ma.outputs) == _comparable(mb.outputs), stage
        assert stage in own_stats or _comparable(ma.stats) == _comparable(mb.stats), stage
    for directory in ("prototypes", "routers"):
        root_a, root_b = a.path(directory), b.path(directory)
        files_a = sorted(p[len(root_a) :] for p in a.fs.find(root_a))
        assert files_a == sorted(p[len(root_b) :] for p in b.fs.find(root_b)) and files_a, directory
        for name in files_a:
            blob_a, blob_b = a.fs.cat_file(root_a + name), b.fs.cat_file(root_b + name)
            if name.endswith(".json"):
                assert _comparable(json.loads(blob_a)) == _comparable(json.loads(blob_b)), name
            else:
                assert blob_a == blob_b, name
    report_a, report_b = (json.loads(r.read_text(r.path("report", "report.json"))) for r in (a, b))
    assert _comparable(report_a) == _comparable(report_b)


# --- a served deployment of the demo, triggered through the API --------------------------------------


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """`lpr-distill serve --cron …` in a subprocess: creates the deployment and runs what is triggered."""
    work = tmp_path_factory.mktemp("served")
    config = work / "demo.yaml"
    config.write_text(yaml.safe_dump(SMALL_DEMO | SMALL_STAGES))
    run_dir = work / "run"
    env = os.environ | server["env"] | {"LPR_DISTILL_QUIET": "1"}
    cli = Path(sys.executable).parent / "lpr-distill"
    command = [str(cli), "serve", "--config", str(config), "--run-dir", str(run_dir), "--name", "nightly"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*command, "--cron", "0 3 * * *"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deployment = asyncio.run(wait_for_deployment("lpr-distill/nightly", proc, work / "serve.log"))
        yield {"deployment": deployment, "run_dir": run_dir, "log": work / "serve.log"}
    finally:
        stop_group(proc)
        log.close()


def _trigger(deployment_id, log: Path):
    from prefect.deployments import run_deployment

    started = time.perf_counter()
    flow_run = run_deployment(deployment_id, poll_interval=1, timeout=600)
    seconds = time.perf_counter() - started
    assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, log.read_text()[-4000:])
    return flow_run, seconds


def test_served_demo_deployment_runs_every_stage_then_skips(served, server):
    from pipeline.stages.registry import STAGE_FUNCTIONS
    from storage.rundir import RunDir
    from storage.states import StatesReader

    deployment = served["deployment"]
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.schedules[0].active
    assert deployment.parameters["run_dir"] == str(served["run_dir"])

    first, first_seconds = _trigger(deployment.id, served["log"])
    runs = asyncio.run(_task_runs(first.id))
    names = sorted(tr.name for tr in runs)
    assert all(tr.state.is_completed() for tr in runs), [(tr.name, tr.state) for tr in runs]
    run = RunDir(str(served["run_dir"]))
    layers = StatesReader(run.url_of(run.output_path("dump"))).layers
    assert len(layers) == 4
    for stage in STAGE_FUNCTIONS:
        assert run.is_complete(stage), stage
        if stage in ("cluster", "distill"):
            assert sorted(n for n in names if n.startswith(f"{stage}-layer_")) == [f"{stage}-{la}" for la in layers]
            assert f"{stage}-commit" in names
        else:
            assert names.count(stage) == 1, names
    artifacts = asyncio.run(_artifacts(first.id))
    assert {"lpr-distill-run", "lpr-distill-layers", "lpr-distill-variants"} <= set(artifacts)
    assert [row["variant"] for row in json.loads(artifacts["lpr-distill-variants"])][:1] == ["original"]
    finished = {stage: run.read_manifest(stage).finished_at for stage in STAGE_FUNCTIONS}

    second, second_seconds = _trigger(deployment.id, served["log"])
    runs = asyncio.run(_task_runs(second.id))
    assert all(tr.state.is_completed() for tr in runs)
    assert not [tr.name for tr in runs if "-layer_" in tr.name or tr.name.endswith("-commit")]
    report = asyncio.run(_artifacts(second.id))["lpr-distill-run"]
    for stage in STAGE_FUNCTIONS:
        assert f"| {stage} | skipped (up to date) |" in report
    assert {stage: run.read_manifest(stage).finished_at for stage in STAGE_FUNCTIONS} == finished
    _timing(
        server_start_s=server["seconds"],
        first_run_s=first_seconds,
        first_flow_s=(first.end_time - first.start_time).total_seconds(),  # inside the run's own process
        second_run_all_skipped_s=second_seconds,
        second_flow_s=(second.end_time - second.start_time).total_seconds(),
    )


async def _flow_run_state(flow_run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state


def _cli(*args: str) -> int:
    """The console script in this process (its error handling included); returns the exit code."""
    from pipeline.cli import run

    argv, sys.argv = sys.argv, ["lpr-distill", *args]
    try:
        run()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def test_deploy_command_creates_a_cron_deployment_a_pool_worker_runs(server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.deploy import check_api_url, schedule
    from pipeline.errors import LprError
    from storage.rundir import RunDir

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SMALL_DEMO | SMALL_STAGES))
    monkeypatch.chdir(tmp_path)
    command = ["deploy", "--config", str(config), "--cron", "0 3 * * *", "--pool", "lpr-test"]
    assert _cli(*command, "--run-dir", "relative/run") == 0

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("lpr-distill/lpr-distill"), await client.read_work_pool(
                "lpr-test"
            )

    deployment, pool = asyncio.run(read())
    assert pool.type == "process"
    assert deployment.work_pool_name == "lpr-test"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.entrypoint == "flows.lpr_flow.lpr_distill"
    assert deployment.parameters["run_dir"] == str(tmp_path / "relative" / "run")  # absolute for the worker
    assert deployment.parameters["config"]["demo"]["num_layers"] == 4

    # a worker of the pool runs a triggered run (in its own subprocess, from the module entrypoint)
    flow_run = run_deployment(deployment.id, timeout=0)
    worker = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "lpr-test", "--run-once"]
    env = os.environ | server["env"] | {"LPR_DISTILL_QUIET": "1"}
    ran = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    state = asyncio.run(_flow_run_state(flow_run.id))
    assert state.is_completed(), (state, ran.stdout[-3000:])
    assert RunDir(str(tmp_path / "relative" / "run")).is_complete("distill")

    # user errors: one line and exit code 2 (the messages are checked on the functions: Prefect's log
    # handlers keep the stream they were made with, so this test does not swap sys.stderr with capsys)
    assert _cli(*command, "--interval", "60") == 2
    with pytest.raises(LprError, match="both --cron and --interval given"):
        schedule("0 3 * * *", 60)
    monkeypatch.delenv("PREFECT_API_URL")
    assert _cli(*command) == 2
    with pytest.raises(LprError, match="PREFECT_API_URL is not set"):
        check_api_url()


# --- in-process flows on the tiny model: CLI parity, Dask, S3, a failing layer -------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model, tiny_corpus):
    """The reference: every stage through the CLI's own loop (`lpr-distill run`)."""
    from pipeline.cli.runs import _run_stages
    from storage.rundir import RunDir

    run = RunDir(str(tmp_path_factory.mktemp("cli") / "run"))
    _run_stages(list(_stages()), run=run, cfg=_cfg(tiny_model, tiny_corpus), force=False)
    return run


def _stages():
    from pipeline.stages.registry import STAGE_FUNCTIONS

    return STAGE_FUNCTIONS


@pytest.fixture(scope="module")
def flow_run(server, tmp_path_factory, tiny_model, tiny_corpus):
    """The flow on threads (one layer at a time) into a fresh directory."""
    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir

    run = RunDir(str(tmp_path_factory.mktemp("flow") / "run"))
    results = run_flow(_cfg(tiny_model, tiny_corpus), run.url)
    return run, results


def test_flow_leaves_exactly_the_cli_outputs_and_manifests(cli_run, flow_run):
    run, results = flow_run
    assert_same_run(cli_run, run)
    for stage in ("cluster", "distill"):  # the commit reused every fanned-out layer: none was redone
        layer_results = results[stage]["layer_results"]
        assert [r["reused"] for r in layer_results] == [False] * len(layer_results)
        manifest = run.read_manifest(stage)
        assert {r["layer"]: r["summary"] for r in layer_results} == manifest.stats["layers"]
        # the manifest times the whole stage (plan, fan-out, commit), not just the commit call
        assert manifest.seconds >= sum(r["summary"]["seconds"] for r in layer_results)


def test_dask_two_workers_gives_the_same_prototypes_and_routers(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg(tiny_model, tiny_corpus, flow=SMALL_STAGES["flow"] | {"task_runner": "dask", "dask_workers": 2})
    started = time.perf_counter()
    results = run_flow(cfg, run.url)
    _timing(dask_flow_run_s=time.perf_counter() - started)
    assert not any(result["skipped"] for result in results.values())
    assert_same_run(flow_run[0], run)


def test_two_shard_dump_gives_the_same_states_and_outputs(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    """dump.shards=2 on the threads runner: two shard tasks, then the merge; the states store equals the
    1-shard flow's row for row, and so do the prototypes, routers and report. A rerun starts no shard task."""
    import numpy as np

    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir
    from storage.states import LAYER_ARRAYS, SHARED_ARRAYS, StatesReader

    run = RunDir(str(tmp_path / "run"))
    dump = tiny_run_config(tiny_model, tiny_corpus, max_tokens=1024, batch_tokens=512, chunk_rows=512)["dump"]
    cfg = _cfg(tiny_model, tiny_corpus, dump=dump | {"shards": 2})
    started = time.perf_counter()
    results = run_flow(cfg, run.url)
    _timing(two_shard_flow_run_s=time.perf_counter() - started)
    assert [r["rows"] for r in results["dump"]["shard_results"]] == [512, 512]
    assert results["dump"]["stats"]["shards"] == 2
    one, two = (StatesReader(r.url_of(r.output_path("dump"))) for r in (flow_run[0], run))
    assert one.num_rows == two.num_rows == 1024 and one.attrs == two.attrs
    for name in SHARED_ARRAYS:
        np.testing.assert_array_equal(one.read(name), two.read(name))
    for layer in one.layers:
        for name in LAYER_ARRAYS:
            np.testing.assert_array_equal(one.read(name, layer=layer), two.read(name, layer=layer))
    assert_same_run(flow_run[0], run, own_stats=("dump",))
    again = run_flow(cfg, run.url)
    assert all(result["skipped"] for result in again.values()) and "shard_results" not in again["dump"]


def test_dask_cluster_at_an_address_from_the_config(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    """An existing Dask cluster (here started by the test: scheduler + 2 worker processes) named by
    ``flow.dask_address``: the layer tasks run on its workers and give the same outputs."""
    from distributed import Client, LocalCluster

    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow = SMALL_STAGES["flow"] | {"task_runner": "dask", "dask_address": cluster.scheduler_address}
        run = RunDir(str(tmp_path / "run"))
        results = run_flow(_cfg(tiny_model, tiny_corpus, flow=flow), run.url)
        with Client(cluster.scheduler_address) as client:
            seen = client.run_on_scheduler(_tasks_seen)
    layers = len(results["cluster"]["layer_results"])
    assert seen["layer_task"]["memory"] == 2 * layers, seen  # every cluster and distill layer ran on this cluster
    assert_same_run(flow_run[0], run)


def _tasks_seen(dask_scheduler) -> dict[str, dict[str, int]]:
    """On the scheduler: per task key prefix, how many tasks went through each state ("memory": finished)."""
    return {name: dict(prefix.state_counts) for name, prefix in dask_scheduler.task_prefixes.items()}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto in server mode, its own process) on 127.0.0.1, with a bucket."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    options["client_kwargs"]["region_name"] = "eu-west-1"
    try:
        for _ in range(200):
            try:
                s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("lpr-flows")
                break
            except OSError:
                time.sleep(0.1)
        yield options
    finally:
        stop_group(proc)
        log.close()


def test_run_directory_on_s3_gives_the_local_report(server, s3, flow_run, tiny_model, tiny_corpus):
    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir

    results = run_flow(_cfg(tiny_model, tiny_corpus), "s3://lpr-flows/run", storage_options=s3)
    assert not any(result["skipped"] for result in results.values())
    remote = RunDir("s3://lpr-flows/run", storage_options=s3)
    assert remote.fs.exists("lpr-flows/run/states.zarr/zarr.json")
    assert_same_run(flow_run[0], remote)
    again = run_flow(_cfg(tiny_model, tiny_corpus), "s3://lpr-flows/run", storage_options=s3)
    assert all(result["skipped"] for result in again.values())


def test_failing_layer_fails_its_task_and_a_rerun_resumes(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    """A real fault: layer_001's prototype file cannot be written (a directory is in the way)."""
    from flows.lpr_flow import lpr_distill
    from pipeline.cli.status import run_status
    from storage.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    cfg = _cfg(tiny_model, tiny_corpus)
    blocker = Path(run.partial_path("cluster")) / "layer_001.safetensors.tmp"
    blocker.mkdir(parents=True)
    state = lpr_distill(cfg.model_dump(mode="json"), run.url, return_state=True)
    assert state.is_failed()
    runs = {tr.name: tr for tr in asyncio.run(_task_runs(state.state_details.flow_run_id))}
    assert runs["cluster-layer_001"].state.is_failed()
    assert runs["cluster-layer_001"].run_count == 2  # flow.retries=1: a storage task is retried once
    assert runs["cluster-layer_000"].state.is_completed()
    assert "cluster-commit" not in runs and "distill-plan" not in runs
    status = run_status(run)["stages"]
    assert status["dump"]["complete"] and not status["cluster"]["complete"]
    assert not run.fs.exists(run.output_path("cluster")) and run.read_manifest("cluster") is None
    done_meta = (Path(run.partial_path("cluster")) / "layer_000.json").read_text()

    blocker.rmdir()  # the fault is fixed
    results = lpr_distill(cfg.model_dump(mode="json"), run.url)
    assert [(r["layer"], r["reused"]) for r in results["cluster"]["layer_results"]] == [
        ("layer_000", True),
        ("layer_001", False),
    ]
    assert (Path(run.output_path("cluster")) / "layer_000.json").read_text() == done_meta  # not redone
    assert_same_run(flow_run[0], run)


def test_config_error_fails_the_plan_at_once_without_layer_tasks(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    """An LprError (here cluster.latent_dim > hidden size 32) is not retried and stops before the fan-out."""
    import shutil

    from flows.lpr_flow import lpr_distill

    shutil.copytree(flow_run[0].url, tmp_path / "run")  # dump done: the rerun skips it
    cfg = _cfg(tiny_model, tiny_corpus, cluster=SMALL_STAGES["cluster"] | {"latent_dim": 1000})
    state = lpr_distill(cfg.model_dump(mode="json"), str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    runs = {tr.name: tr for tr in asyncio.run(_task_runs(state.state_details.flow_run_id))}
    assert runs["dump"].state.is_completed()
    assert runs["cluster-plan"].state.is_failed() and runs["cluster-plan"].run_count == 1
    assert not [name for name in runs if "-layer_" in name]
    with pytest.raises(Exception, match=r"cluster.latent_dim=1000 should be ≤ the hidden size 32"):
        state.result()


def test_force_redoes_every_stage_and_layer_with_the_same_outputs(server, flow_run, tmp_path, tiny_model, tiny_corpus):
    import shutil

    from flows.lpr_flow import run_flow
    from storage.rundir import RunDir

    shutil.copytree(flow_run[0].url, tmp_path / "run")
    results = run_flow(_cfg(tiny_model, tiny_corpus), str(tmp_path / "run"), force=True)
    assert not any(result["skipped"] for result in results.values())
    for stage in ("cluster", "distill"):
        assert not any(layer["reused"] for layer in results[stage]["layer_results"])
    assert_same_run(flow_run[0], RunDir(str(tmp_path / "run")))
