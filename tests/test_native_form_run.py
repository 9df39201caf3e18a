"""The native form beside an LPR run (what the demo does): validate's ``native`` variant distils the
routers in the family's own tensors into ``RUN_DIR/forms/native`` when the run's cosine LPRs do not fold,
``export --checkpoint`` then ships them, and ``validate --checkpoint`` measures the files with the same
figures as the ``native`` variant."""

from __future__ import annotations

import pytest

from pipeline.stages.distill import run_distill
from storage.derived_run import native_form_run
from storage.report import read_report
from tests.conftest import clustered_run
from tests.test_cli import assert_one_line_error, invoke

MODEL_LEVEL = {"model_steps": 2, "model_batch_sequences": 2, "model_val_sequences": 2, "model_eval_every": 1}
DISTILL = {"steps": 10, "batch_rows": 64, "buffer_rows": 256, "val_rows": 64, "calibration_sequences": 4}
MEASURE = ("--tasks", "", "--sequences", "8")


@pytest.mark.slow
def test_a_cosine_lpr_run_ships_its_native_form(tmp_path, tiny_model, tiny_corpus, monkeypatch, capsys):
    cfg, run = clustered_run(tmp_path / "run", tiny_model, tiny_corpus, distill=DISTILL | MODEL_LEVEL)
    assert cfg.router.form == "lpr" and cfg.router.similarity == "cosine"
    run_distill(cfg=cfg, run=run)
    out = tmp_path / "checkpoint"
    code, _, err = invoke(monkeypatch, capsys, "export", run.url, "--checkpoint", str(out))
    assert_one_line_error(code, err, "router.form: native", "variant 'native'")
    assert not out.exists()

    variants = ("--variants", "original,original+bias,lpr,native")
    code, _, err = invoke(monkeypatch, capsys, "validate", run.url, *variants, *MEASURE)
    assert code == 0, err
    native = native_form_run(run)
    assert native.is_complete("distill") and native.read_config() is not None
    report = read_report(run)
    assert report["variants"]["native"]["build"]["run"] == native.url
    assert report["native"]["verdict"] in ("dominates", "dominated", "trade-off")
    assert "Drop-in `native` routers" in run.read_text(run.path("report", "report.md"))
    native_distilled = native.read_manifest("distill").finished_at

    code, stdout, err = invoke(monkeypatch, capsys, "export", run.url, "--checkpoint", str(out))
    assert code == 0 and "checkpoint (weight)" in stdout, err
    code, _, err = invoke(monkeypatch, capsys, "validate", run.url, *variants, *MEASURE, "--checkpoint", str(out))
    assert code == 0, err
    report = read_report(run)
    assert native.read_manifest("distill").finished_at == native_distilled  # not distilled again
    shipped, measured = (report["variants"][name] for name in ("native", "checkpoint"))
    assert measured["cross_entropy"] == pytest.approx(shipped["cross_entropy"], abs=1e-9)
    assert measured["mean"]["slot"]["gini"] == pytest.approx(shipped["mean"]["slot"]["gini"], abs=1e-9)
    assert shipped["cross_entropy"] != report["variants"]["lpr"]["cross_entropy"]
