"""Recalibration on a traffic sample: a new routers version, judged on held-out traffic, published when
better; the earlier version kept; errors before anything is written."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.cli.status import run_status
from pipeline.config import CorpusConfig
from pipeline.errors import LprError
from pipeline.router.load import distilled_routers
from pipeline.stages.distill import run_distill
from pipeline.stages.export import run_export
from pipeline.stages.recalibrate import run_recalibrate
from pipeline.testing.tiny_data import WORDS
from storage.rundir import RunDir
from storage.versions import current_version, list_versions, served_version
from tests.conftest import clustered_run
from tests.test_cli import assert_one_line_error, invoke

DISTILL = {
    "steps": 20,
    "batch_rows": 128,
    "buffer_rows": 1024,
    "eval_every": 10,
    "val_rows": 512,
    "model_steps": 4,
    "model_batch_sequences": 2,
    "model_val_sequences": 4,
    "model_eval_every": 2,
    "calibration_sequences": 16,
}
RECALIBRATE = {"sequences": 48, "min_sequences": 16, "heldout_sequences": 16}


def skewed_traffic(path, n_docs: int = 240, seed: int = 0):
    """A folder of documents drawn from a third of the corpus's words: traffic of another mix."""
    rng = random.Random(seed)
    words = WORDS[: len(WORDS) // 3]
    path.mkdir(parents=True)
    for i in range(n_docs):
        (path / f"request-{i:04d}").write_text(" ".join(rng.choice(words) for _ in range(60)) + "\n")
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model, tiny_corpus):
    path = tmp_path_factory.mktemp("recalibrate") / "run"
    cfg, run = clustered_run(path, tiny_model, tiny_corpus, distill=DISTILL, recalibrate=RECALIBRATE)
    run_distill(cfg=cfg, run=run)
    run_export(cfg=cfg, run=run, out=path / "lpr")
    return cfg, run


@pytest.fixture
def fresh(distilled, tmp_path):
    """A copy of the distilled run (each test writes versions of its own)."""
    cfg, run = distilled
    target = tmp_path / "run"
    shutil.copytree(run.root, target)
    copy = RunDir(str(target))
    run_export(cfg=cfg, run=copy, out=target / "lpr")  # the copy's export manifest names its own lpr/
    return cfg, copy


def traffic_config(cfg, source) -> CorpusConfig:
    return CorpusConfig.model_validate(cfg.corpus.model_dump() | {"source": str(source), "format": "auto"})


@pytest.mark.slow
def test_recalibrate_publishes_a_better_version_and_keeps_the_old(fresh, tmp_path):
    cfg, run = fresh
    traffic = skewed_traffic(tmp_path / "traffic")
    before_routers, _ = distilled_routers(run)
    manifest = run_recalibrate(cfg=cfg, run=run, traffic=traffic_config(cfg, traffic))
    stats = manifest.stats
    assert stats["version"] == 1 and stats["parent"] == 0
    assert stats["after"]["gini"] < stats["before"]["gini"]  # more even on the traffic's held-out documents
    assert stats["published"] == stats["better"]
    assert set(stats["before"]["layers"]) == set(stats["after"]["layers"]) and len(stats["after"]["layers"]) == 2
    assert run.read_manifest("recalibrate") is not None
    # only the choice bias changed, and version 0 is still there as it was
    new_routers, _ = distilled_routers(run, 1)
    old_routers, _ = distilled_routers(run, 0)
    for name, router in new_routers.items():
        old = old_routers[name].state_dict()
        for key, value in router.state_dict().items():
            assert value.equal(old[key]) == (key != "bias"), key
            assert old[key].equal(before_routers[name].state_dict()[key])
    versions = run_status(run)["versions"]
    assert [v["version"] for v in versions] == [0, 1]
    if stats["published"]:
        assert current_version(run) == served_version(run) == 1 and versions[1]["current"]
        exported = json.loads(Path(run.root, "lpr", "routers.json").read_text())
        assert exported["metrics"] == distilled_routers(run)[1]
        assert run_status(run)["stages"]["export"]["complete"]


@pytest.mark.slow
def test_traffic_that_cannot_be_balanced_better_is_kept_not_published(fresh, tmp_path):
    """Recalibrating twice on the same traffic: the second version cannot beat the first by the margin;
    it is kept as a version, the first stays served."""
    cfg, run = fresh
    traffic = traffic_config(cfg, skewed_traffic(tmp_path / "traffic"))
    cfg = cfg.model_copy(update={"recalibrate": cfg.recalibrate.model_copy(update={"publish": "always"})})
    run_recalibrate(cfg=cfg, run=run, traffic=traffic)
    cfg = cfg.model_copy(update={"recalibrate": cfg.recalibrate.model_copy(update={"publish": "better"})})
    second = run_recalibrate(cfg=cfg, run=run, traffic=traffic).stats
    assert second["parent"] == 1 and second["version"] == 2
    assert not second["better"] and not second["published"]
    assert "less than" in second["judgement"]
    assert served_version(run) == 1
    assert [v["version"] for v in list_versions(run)] == [1, 2]


def test_bad_traffic_and_missing_routers_are_one_line_errors(monkeypatch, capsys, fresh, tmp_path, tiny_model):
    cfg, run = fresh
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\0\1\2")
    few = tmp_path / "few"
    few.mkdir()
    (few / "one").write_text("def class return import yield lambda")
    cases = [
        (str(run.root), str(empty), "has no text: 1 files seen"),
        (str(run.root), str(few), "is too small to calibrate on"),
        (str(tmp_path / "no-run"), str(few), "has no distilled routers"),
    ]
    for run_dir, traffic, needle in cases:
        code, _, err = invoke(monkeypatch, capsys, "recalibrate", run_dir, "--corpus", traffic)
        assert_one_line_error(code, err, needle)
    assert list_versions(run) == [] and current_version(run) == 0
    assert not (tmp_path / "no-run").exists()
    with pytest.raises(LprError, match="no distilled routers"):
        run_recalibrate(cfg=cfg, run=RunDir(str(tmp_path / "none")), traffic=traffic_config(cfg, few))


@pytest.mark.slow
def test_cli_prints_the_before_after_table_and_status_shows_both(monkeypatch, capsys, fresh, tmp_path):
    _, run = fresh
    traffic = skewed_traffic(tmp_path / "traffic")
    code, out, err = invoke(monkeypatch, capsys, "recalibrate", str(run.root), "--corpus", str(traffic))
    assert code == 0, err
    assert "Gini before" in out and "version 1:" in out and "held-out traffic:" in out
    code, out, _ = invoke(monkeypatch, capsys, "status", str(run.root))
    assert code == 0 and "routers versions" in out and "recalibrate on" in out
