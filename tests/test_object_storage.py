"""The dump into a run directory on S3: a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from pipeline.cli.status import run_status
from pipeline.config import build_config
from pipeline.stages.dump import run_dump
from storage.rundir import RunDir
from storage.states import StatesReader
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    server_mod = pytest.importorskip("moto.server", reason="install the s3 extras: pip install -e '.[dev,s3]'")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(
        key="test", secret="test", client_kwargs={"endpoint_url": endpoint, "region_name": "eu-west-1"}
    )
    fs.mkdir("lpr-test")
    yield endpoint
    server.stop()


def test_dump_to_s3_matches_local(tmp_path, tiny_model, tiny_corpus, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    options = {"client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "eu-west-1"}}
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus, max_tokens=400))

    remote = RunDir("s3://lpr-test/run", storage_options=options)
    remote.ensure()
    manifest = run_dump(cfg=cfg, run=remote)
    assert manifest.outputs["rows"] == 400
    assert run_status(remote)["stages"]["dump"]["complete"]
    assert run_dump(cfg=cfg, run=remote).skipped

    local = RunDir(str(tmp_path / "run"))
    local.ensure()
    run_dump(cfg=cfg, run=local)
    a = StatesReader(remote.url_of(remote.output_path("dump")), options)
    b = StatesReader(local.url_of(local.output_path("dump")))
    assert a.num_rows == b.num_rows == 400
    for layer in b.layers:
        np.testing.assert_array_equal(a.read("x", layer=layer), b.read("x", layer=layer))
        np.testing.assert_array_equal(a.read("topk_idx", layer=layer), b.read("topk_idx", layer=layer))
    np.testing.assert_array_equal(a.read("token_id"), b.read("token_id"))
