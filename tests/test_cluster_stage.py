"""The cluster stage on a tiny real dump: outputs, exact balance, reuse, --layers, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.clustering.sampling import sample_ranges
from pipeline.config import build_config
from pipeline.errors import LprError
from pipeline.stages.cluster import run_cluster
from pipeline.stages.dump import run_dump
from storage.prototypes import read_layer
from storage.rundir import RunDir
from storage.states import StatesReader
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_model, tiny_corpus):
    """A run directory with a complete dump (2 MoE layers, 4 experts, top-2, hidden 32)."""
    path = tmp_path_factory.mktemp("cluster") / "run"
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus))
    run = RunDir(str(path))
    run.ensure()
    run_dump(cfg=cfg, run=run)
    return path, tiny_run_config(tiny_model, tiny_corpus)


def _config(base: dict, **cluster) -> object:
    return build_config(base | {"cluster": {"latent_dim": 8, "iterations": 5} | cluster})


def _copy(tmp_path, dumped) -> RunDir:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(dumped[0], target)
    return RunDir(str(target))


def test_prototypes_for_every_layer_exactly_balanced(tmp_path, dumped):
    run = _copy(tmp_path, dumped)
    cfg = _config(dumped[1])
    manifest = run_cluster(cfg=cfg, run=run)
    reader = StatesReader(run.url_of(run.output_path("dump")))
    assert run.is_complete("cluster")
    assert manifest.outputs["layers"] == reader.layers
    for layer in reader.layers:
        tensors, meta = read_layer(run, run.output_path("cluster"), layer)
        assert tensors["components"].shape == (8, 32) and tensors["centroids"].shape == (4, 8)
        assert sorted(tensors["expert_of_cluster"].tolist()) == [0, 1, 2, 3]
        np.testing.assert_array_equal(tensors["expert_of_cluster"][tensors["cluster_of_expert"]], np.arange(4))
        assert meta["kmeans"]["size_max"] - meta["kmeans"]["size_min"] <= 1
        assert meta["rows"] == reader.num_rows  # the store is smaller than the sample: every row
        assert 0 < meta["variance_kept"] <= 1
        assert meta["matching"]["matched_share"] >= meta["matching"]["chance_share"] * 0.5
    again = run_cluster(cfg=cfg, run=run)
    assert again.skipped


def _meta(run: RunDir, layer: str) -> dict:
    return json.loads(run.read_text(f"{run.output_path('cluster')}/{layer}.json"))


def test_force_layers_redoes_only_those(tmp_path, dumped):
    run = _copy(tmp_path, dumped)
    cfg = _config(dumped[1])
    run_cluster(cfg=cfg, run=run)
    before = {p: _meta(run, p) for p in ("layer_000", "layer_001")}
    run_cluster(cfg=cfg, run=run, force=True, layers=["1"])
    after = {p: _meta(run, p) for p in ("layer_000", "layer_001")}
    assert after["layer_000"]["seconds"] == before["layer_000"]["seconds"]  # reused, not recomputed
    assert after["layer_001"]["kmeans"]["seconds"] != before["layer_001"]["kmeans"]["seconds"]
    assert run.is_complete("cluster")


def test_layers_alone_redo_those_and_a_wrong_name_is_an_error(tmp_path, dumped):
    """``--layers`` without ``--force`` still redoes the named layers on a complete run (it used to be
    skipped as up to date), and a layer the store lacks is an error even when nothing would run."""
    run = _copy(tmp_path, dumped)
    cfg = _config(dumped[1])
    run_cluster(cfg=cfg, run=run)
    before = _meta(run, "layer_001")
    with pytest.raises(LprError, match="layer '9' is not in the states store"):
        run_cluster(cfg=cfg, run=run, layers=["9"])
    again = run_cluster(cfg=cfg, run=run, layers=["layer_001"])
    assert not again.skipped
    assert _meta(run, "layer_001")["kmeans"]["seconds"] != before["kmeans"]["seconds"]


def test_sample_smaller_than_the_layer(tmp_path, dumped):
    """A layer larger than the sample is clustered from exactly ``sample_rows`` rows of whole chunks."""
    run = _copy(tmp_path, dumped)
    reader = StatesReader(run.url_of(run.output_path("dump")))
    sample = reader.num_rows // 3
    cfg = _config(dumped[1], sample_rows=sample, pca_rows=sample // 2, block_rows=100)
    run_cluster(cfg=cfg, run=run)
    _, meta = read_layer(run, run.output_path("cluster"), "layer_000")
    assert meta["rows"] == sample and meta["pca_rows"] == sample // 2


def test_sample_ranges_are_whole_chunks():
    ranges = sample_ranges(10_000, 256, 3000, seed=0)
    assert sum(b - a for a, b in ranges) == 3000
    assert all(a % 256 == 0 for a, _ in ranges) and ranges == sorted(ranges)
    assert sample_ranges(1000, 256, 5000, seed=0) == [(0, 256), (256, 512), (512, 768), (768, 1000)]


@pytest.mark.parametrize(
    ("cluster", "layers", "message"),
    [
        ({"latent_dim": 40}, None, r"cluster.latent_dim=40 should be ≤ the hidden size 32"),
        ({"assign_k": 4}, None, r"cluster.assign_k=4 should be < the number of experts 4"),
        ({}, ["layer_007"], r"layer 'layer_007' is not in the states store \(it has layer_000, layer_001\)"),
    ],
)
def test_bad_input(tmp_path, dumped, cluster, layers, message):
    run = _copy(tmp_path, dumped)
    with pytest.raises(LprError, match=message):
        run_cluster(cfg=_config(dumped[1], **cluster), run=run, force=True, layers=layers)
    assert not run.fs.exists(run.partial_path("cluster"))


def test_cli_without_a_dump_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cluster", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no complete states store" in result.stderr and "lpr-distill dump RUN_DIR" in result.stderr
