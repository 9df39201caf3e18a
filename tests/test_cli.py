"""The CLI: bad input is one line and a non-zero exit, leaving nothing that looks complete."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from pipeline import cli
from storage.rundir import STAGES
from tests.conftest import save_tiny_moe, tiny_run_config


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    monkeypatch.setattr(sys, "argv", ["lpr-distill", *args])
    code = 0
    try:
        cli.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_complete(monkeypatch, capsys, run_dir) -> None:
    if not run_dir.exists():
        return
    code, out, _ = invoke(monkeypatch, capsys, "status", str(run_dir), "--json")
    assert code == 0
    assert not any(s["complete"] for s in json.loads(out)["stages"].values())


@pytest.fixture
def dense_model(tmp_path_factory):
    return save_tiny_moe(tmp_path_factory.mktemp("dense"), family="qwen3")


def test_missing_model_path(monkeypatch, capsys, tmp_path, tiny_corpus):
    run = tmp_path / "run"
    code, _, err = invoke(
        monkeypatch, capsys, "dump", str(run), "--model", str(tmp_path / "nope"), "--corpus", str(tiny_corpus)
    )
    assert_one_line_error(code, err, "does not exist", "--model")
    assert_nothing_complete(monkeypatch, capsys, run)


def test_dense_model(monkeypatch, capsys, tmp_path, tiny_corpus, dense_model):
    run = tmp_path / "run"
    code, _, err = invoke(
        monkeypatch, capsys, "dump", str(run), "--model", str(dense_model), "--corpus", str(tiny_corpus)
    )
    assert_one_line_error(code, err, "dense model", "qwen3_moe")
    assert_nothing_complete(monkeypatch, capsys, run)


def test_missing_corpus(monkeypatch, capsys, tmp_path, tiny_model):
    run = tmp_path / "run"
    code, _, err = invoke(
        monkeypatch, capsys, "dump", str(run), "--model", str(tiny_model), "--corpus", str(tmp_path / "none.jsonl")
    )
    assert_one_line_error(code, err, "none.jsonl does not exist")
    assert_nothing_complete(monkeypatch, capsys, run)


def test_empty_corpus(monkeypatch, capsys, tmp_path, tiny_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    run = tmp_path / "run"
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--model", str(tiny_model), "--corpus", str(empty))
    assert_one_line_error(code, err, "has no text")
    assert_nothing_complete(monkeypatch, capsys, run)


def test_unknown_config_key(monkeypatch, capsys, tmp_path, tiny_model, tiny_corpus):
    config = tmp_path / "bad.yaml"
    data = tiny_run_config(tiny_model, tiny_corpus)
    data["dump"]["max_tokenz"] = 5
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--config", str(config))
    assert_one_line_error(code, err, "unknown key 'dump.max_tokenz'")
    assert not run.exists()  # a bad config is caught before anything is written


def test_wrong_type_via_set(monkeypatch, capsys, tmp_path):
    code, _, err = invoke(monkeypatch, capsys, "config", "show", "--set", "dump.batch_tokens=lots")
    assert_one_line_error(code, err, "'dump.batch_tokens'", "integer")


def test_config_show_and_reproduce(monkeypatch, capsys, tmp_path, tiny_model, tiny_corpus):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model, tiny_corpus, max_tokens=200)))
    run = tmp_path / "run"
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--config", str(config), "--set", "seed=7")
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["dump"]["max_tokens"] == 200
    code, out, _ = invoke(monkeypatch, capsys, "config", "show", str(run))
    assert yaml.safe_load(out) == saved
    # the saved config reproduces the run: same fingerprint, so the stage is skipped
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--config", str(run / "config.yaml"))
    assert code == 0
    code, out, _ = invoke(monkeypatch, capsys, "status", str(run), "--json")
    status = json.loads(out)
    assert status["stages"]["dump"]["complete"] and status["stages"]["dump"]["states"]["rows"] == 200
    assert list(status["stages"]) == list(STAGES)


def test_status_of_missing_run_dir(monkeypatch, capsys, tmp_path):
    code, _, err = invoke(monkeypatch, capsys, "status", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "does not exist")


def test_bad_rerun_keeps_the_complete_stage(monkeypatch, capsys, tmp_path, tiny_model, tiny_corpus):
    run = tmp_path / "run"
    args = ["dump", str(run), "--model", str(tiny_model), "--corpus", str(tiny_corpus), "--max-tokens", "100"]
    assert invoke(monkeypatch, capsys, *args)[0] == 0
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--model", str(tmp_path / "typo"))
    assert_one_line_error(code, err, "does not exist")
    _, out, _ = invoke(monkeypatch, capsys, "status", str(run), "--json")
    assert json.loads(out)["stages"]["dump"]["complete"]


def test_run_command_runs_every_stage(monkeypatch, capsys, tmp_path, tiny_model, tiny_corpus):
    config = tmp_path / "nightly.yaml"
    few_steps = {"steps": 40, "eval_every": 20, "model_steps": 4, "model_eval_every": 2}
    distill = {"calibration_sequences": 256, **few_steps}
    data = tiny_run_config(tiny_model, tiny_corpus, max_tokens=150) | {"distill": distill}
    config.write_text(yaml.safe_dump(data))  # the tiny corpus has 725 sequences
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(monkeypatch, capsys, "run", str(config))
    assert code == 0, err
    _, out, _ = invoke(monkeypatch, capsys, "status", "runs/nightly", "--json")
    stages = json.loads(out)["stages"]
    assert stages["dump"]["complete"] and stages["dump"]["states"]["rows"] == 150


def test_dump_reads_a_folder_of_extensionless_text_and_one_of_source_code(monkeypatch, capsys, tmp_path, tiny_model):
    """`lpr-distill dump RUN --model M --corpus DIR` on licence-like files without an extension and on
    a folder of .py files: both are read, every training-side document lands in the states."""
    from pipeline.data.documents import is_heldout
    from pipeline.testing.tiny_data import make_texts

    licences, code = tmp_path / "licences", tmp_path / "code"
    licences.mkdir()
    code.mkdir()
    for i, text in enumerate(make_texts(12, words_per_doc=60)):
        (licences / f"LICENSE-{i}").write_text(text)
        (code / f"module_{i}.py").write_text(f"def f{i}():\n    return {text!r}\n")
    for corpus in (licences, code):
        run = tmp_path / f"run-{corpus.name}"
        status, _, err = invoke(
            monkeypatch, capsys, "dump", str(run), "--model", str(tiny_model), "--corpus", str(corpus)
        )
        assert status == 0, err
        train = [p.name for p in corpus.iterdir() if not is_heldout(p.name, 0.1)]
        stats = json.loads((run / "manifests" / "dump.json").read_text())["stats"]
        assert stats["documents_in_rows"] == len(train) > 0
