"""The bad-input catalogue (issue 9, item 3): one test per item, through the real CLI entry point.

Each bad input must cost the user exactly one line on stderr (``error: <problem>. <fix>.``), a
non-zero exit, no traceback, and leave the run directory as it was: no stage newly complete, no
manifest, and the run's ``config.yaml`` unchanged (a rejected command must not become the run's
config). Most cases run ``pipeline.cli.run`` (the console script's entry point, error boundary
included) in this process, which is seconds instead of a fresh interpreter per case; the full-disk
case and one sanity case run a real subprocess.

Third-party progress bars (transformers' "Loading weights") are turned off so that stderr is the
product's own output only.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline import cli, load_lpr_model
from pipeline.errors import LprError
from pipeline.moe.families import FAMILIES
from storage.rundir import STAGES
from tests.conftest import save_tiny_moe, tiny_run_config

ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _no_third_party_bars():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console script's entry point on ``args``: (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["lpr-distill", *args])
    code = 0
    try:
        cli.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, out: str, err: str) -> str:
    """The single error line (without ``error: ``), after checking the one-line contract."""
    assert code != 0, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0].removeprefix("error: ")


def snapshot(monkeypatch, capsys, run: Path) -> tuple[dict[str, bool], str | None, list[str]]:
    """What a failed command must not change: complete stages, config.yaml, manifests."""
    if not run.exists():
        return {}, None, []
    code, out, err = invoke(monkeypatch, capsys, "status", str(run), "--json")
    assert code == 0, err
    stages = {name: info["complete"] for name, info in json.loads(out)["stages"].items()}
    config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else None
    manifests = sorted(p.name for p in (run / "manifests").glob("*")) if (run / "manifests").exists() else []
    return stages, config, manifests


def assert_untouched(monkeypatch, capsys, run: Path, before) -> None:
    after = snapshot(monkeypatch, capsys, run)
    if before == ({}, None, []):  # the run directory did not exist: nothing may look complete now
        assert not any(after[0].values()) and after[1] is None and after[2] == []
        if not (run / "states.zarr.partial").exists():  # a resumable dump is kept; else nothing at all
            assert not run.exists(), sorted(p.name for p in run.rglob("*"))
    else:
        assert after == before
    for stage in STAGES:  # no stage output without its manifest
        output = {"dump": "states.zarr", "cluster": "prototypes", "distill": "routers"}.get(stage)
        if output and (run / output).exists():
            assert (run / "manifests" / f"{stage}.json").exists(), stage


def fails_with(monkeypatch, capsys, run: Path, args: list[str], expected: str) -> str:
    """Run a command that must fail with exactly ``expected`` and leave ``run`` as it was."""
    before = snapshot(monkeypatch, capsys, run)
    line = one_line(*invoke(monkeypatch, capsys, *args))
    assert line == expected
    assert_untouched(monkeypatch, capsys, run, before)
    return line


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model, tiny_corpus) -> Path:
    data = tiny_run_config(tiny_model, tiny_corpus, max_tokens=2048, chunk_rows=256) | {
        "cluster": {"latent_dim": 8, "iterations": 5},
        "router": {"calibration_rows": 512},
    }
    path = tmp_path_factory.mktemp("bad-input") / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, config_file) -> Path:
    """A run directory with a complete dump of the tiny model (2,048 rows, chunks of 256)."""
    from pipeline.config import build_config, to_yaml
    from pipeline.stages.dump import run_dump
    from storage.rundir import RunDir

    cfg = build_config(yaml.safe_load(config_file.read_text()))
    run = RunDir(str(tmp_path_factory.mktemp("dumped") / "run"))
    run.ensure()
    run.write_config(to_yaml(cfg))
    run_dump(cfg=cfg, run=run)
    return Path(run.root)


@pytest.fixture
def run_copy(tmp_path, dumped) -> Path:
    target = tmp_path / "run"
    shutil.copytree(dumped, target)
    return target


def dump_args(run: Path, model, corpus, *extra: str) -> list[str]:
    return ["dump", str(run), "--model", str(model), "--corpus", str(corpus), "--set", "corpus.seq_len=32", *extra]


# --- the model ------------------------------------------------------------------------------


def test_missing_model_path(monkeypatch, capsys, tmp_path, tiny_corpus):
    model = tmp_path / "no-such-model"
    fails_with(
        monkeypatch,
        capsys,
        tmp_path / "run",
        dump_args(tmp_path / "run", model, tiny_corpus),
        f"model path {model} does not exist. Pass an existing checkpoint directory or a hub id as --model.",
    )


def test_unreadable_model_path(monkeypatch, capsys, tmp_path, tiny_model, tiny_corpus):
    """A checkpoint whose config.json cannot be read (garbage bytes; or no read permission, not as root)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_bytes(b"\x00\xff not json")
    run = tmp_path / "run"
    fails_with(
        monkeypatch,
        capsys,
        run,
        dump_args(run, model, tiny_corpus),
        f"cannot load model {model} (It looks like the config file at '{model}/config.json' is not a valid JSON "
        "file.). Check --model and --revision.",
    )
    not_a_dir = tmp_path / "weights.bin"
    not_a_dir.write_bytes(b"\0" * 16)
    fails_with(
        monkeypatch,
        capsys,
        run,
        dump_args(run, not_a_dir, tiny_corpus),
        f"model path {not_a_dir} is not a directory. Pass the checkpoint's directory (with config.json).",
    )
    if not ROOT:  # permission bits do not stop root
        shutil.copy(tiny_model / "config.json", model / "config.json")
        (model / "config.json").chmod(0)
        fails_with(
            monkeypatch,
            capsys,
            run,
            dump_args(run, model, tiny_corpus),
            f"model directory {model} is not readable. Check its permissions.",
        )


def test_dense_model(monkeypatch, capsys, tmp_path, tiny_corpus):
    dense = save_tiny_moe(tmp_path / "dense-qwen3", family="qwen3")  # from_config + save_pretrained
    run = tmp_path / "run"
    line = fails_with(
        monkeypatch,
        capsys,
        run,
        dump_args(run, dense, tiny_corpus),
        "model type 'qwen3' is a dense model with no MoE layer to distil. Point --model at a Mixture-of-Experts "
        f"checkpoint (supported families: {', '.join(sorted(FAMILIES))}).",
    )
    assert "qwen3_moe" in line and "mixtral" in line


def test_unsupported_moe_family(monkeypatch, capsys, tmp_path, tiny_corpus):
    from transformers import AutoConfig

    model = tmp_path / "dbrx"
    AutoConfig.for_model("dbrx").save_pretrained(model)  # an MoE family whose router has no (logits, w, idx)
    run = tmp_path / "run"
    line = one_line(*invoke(monkeypatch, capsys, *dump_args(run, model, tiny_corpus)))
    assert line.startswith("MoE family 'dbrx' is not supported: its router returns logits only")
    supported = line.split("Supported families: ", 1)[1].split(";", 1)[0].split(", ")
    assert supported == sorted(FAMILIES) and {"qwen3_moe", "mixtral", "deepseek_v3", "olmoe"} <= set(supported)
    assert_untouched(monkeypatch, capsys, run, ({}, None, []))


def test_trust_remote_code_needed(monkeypatch, capsys, tmp_path, tiny_corpus):
    """A checkpoint whose config maps to its own Python code: refused, and that code never runs."""
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "custom-code-ran"
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}
    (model / "config.json").write_text(json.dumps({"model_type": "lpr_custom_moe", "auto_map": auto_map}))
    (model / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'lpr_custom_moe'\n"
    )
    run = tmp_path / "run"
    fails_with(
        monkeypatch,
        capsys,
        run,
        dump_args(run, model, tiny_corpus),
        f"model {model} needs its own code to load. If you trust it, set model.trust_remote_code: true "
        "(--trust-remote-code).",
    )
    assert not marker.exists()


# --- the corpus -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "empty", "not-utf8", "jsonl-without-field"])
def test_bad_corpus(monkeypatch, capsys, tmp_path, tiny_model, case):
    corpus = {
        "missing": tmp_path / "nowhere.jsonl",
        "empty": tmp_path / "empty.txt",
        "not-utf8": tmp_path / "latin1.txt",
        "jsonl-without-field": tmp_path / "rows.jsonl",
    }[case]
    if case == "empty":
        corpus.write_text("  \n\n")
    elif case == "not-utf8":
        corpus.write_bytes("café crème, naïve façade".encode("latin-1"))
    elif case == "jsonl-without-field":
        corpus.write_text(json.dumps({"content": "some text"}) + "\n")
    expected = {
        "missing": f"corpus {corpus} does not exist. Pass an existing file, folder or URL as --corpus.",
        "empty": f"corpus {corpus} has no text. Point --corpus at files or rows that contain text.",
        "not-utf8": f"corpus file {corpus} is not UTF-8 text (byte 3). Convert it to UTF-8 or remove it from the "
        "corpus.",
        "jsonl-without-field": f"{corpus}:1 has no field 'text'. Set corpus.text_field (--text-field) to the field "
        "that holds the text.",
    }[case]
    run = tmp_path / "run"
    fails_with(monkeypatch, capsys, run, dump_args(run, tiny_model, corpus), expected)


# --- the config -----------------------------------------------------------------------------


def test_config_unknown_key(monkeypatch, capsys, tmp_path, config_file):
    data = yaml.safe_load(config_file.read_text())
    data["dump"]["max_tokenz"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    fails_with(
        monkeypatch,
        capsys,
        run,
        ["dump", str(run), "--config", str(bad)],
        f"{bad}: unknown key 'dump.max_tokenz'. Fix the key or value (see `lpr-distill config show`).",
    )
    assert not run.exists()  # caught before anything is written


def test_config_wrong_type(monkeypatch, capsys, tmp_path, config_file):
    run = tmp_path / "run"
    fails_with(
        monkeypatch,
        capsys,
        run,
        ["dump", str(run), "--config", str(config_file), "--set", "dump.batch_tokens=lots"],
        f"{config_file}: 'dump.batch_tokens': input should be a valid integer, unable to parse string as an "
        "integer (got 'lots'). Fix the key or value (see `lpr-distill config show`).",
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "cluster.latent_dim=33",
            "cluster.latent_dim=33 should be ≤ the hidden size 32. Set --set cluster.latent_dim=32.",
        ),
        (
            "cluster.assign_k=5",
            "cluster.assign_k=5 should be < the number of experts 4. Choose a smaller assign_k.",
        ),
    ],
)
def test_config_impossible_value_for_the_model(monkeypatch, capsys, run_copy, override, expected):
    """Values that only the dumped model shows impossible: latent dim > hidden size, k > experts."""
    fails_with(monkeypatch, capsys, run_copy, ["cluster", str(run_copy), "--set", override], expected)
    assert not (run_copy / "prototypes.partial").exists()


def test_config_impossible_value_on_its_own(monkeypatch, capsys, tmp_path):
    """Cross-field checks that need no model: the demo's top-k above its expert count."""
    line = one_line(
        *invoke(monkeypatch, capsys, "config", "show", "--set", "demo.num_experts=4", "--set", "demo.top_k=8")
    )
    fix = "Fix the key or value (see `lpr-distill config show`)."
    assert line == f"defaults: demo.top_k=8 should be ≤ demo.num_experts=4. {fix}"


# --- the states store -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cluster", "export"])
@pytest.mark.parametrize("change", ["model", "revision"])
def test_states_from_another_model(monkeypatch, capsys, tmp_path, run_copy, tiny_model, change, command):
    """A store dumped from one checkpoint, then clustered or exported with a config naming another
    checkpoint (same architecture, other weights) or another revision."""
    if change == "model":
        other = save_tiny_moe(tmp_path / "other", seed=1)
        override, named = f"model.path={other}", f"{other} (revision None)"
    else:
        override, named = "model.revision=v2", f"{tiny_model} (revision v2)"
    args = ["cluster", str(run_copy), "--set", override]
    if command == "export":
        assert invoke(monkeypatch, capsys, "cluster", str(run_copy))[0] == 0
        args = ["export", str(run_copy), "--init-only", "--out", str(tmp_path / "routers"), "--set", override]
    fails_with(
        monkeypatch,
        capsys,
        run_copy,
        args,
        f"the states store in {run_copy} was dumped from model {tiny_model} (revision None), but the config names "
        f"{named}. Pass the model the run was dumped with (--set model.path={tiny_model}), or dump again with --force.",
    )
    assert not (run_copy / "prototypes.partial").exists() and not (tmp_path / "routers").exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_zarr_chunk(monkeypatch, capsys, run_copy, damage):
    chunk = run_copy / "states.zarr" / "layer_000" / "x" / "c" / "3" / "0"  # rows 768–1,024
    data = chunk.read_bytes()
    assert len(data) == 256 * 32 * 2  # uncompressed float16 rows
    chunk.write_bytes(data[:100] if damage == "truncated" else os.urandom(len(data) + 64))
    size = 50 if damage == "truncated" else (len(data) + 64) // 2
    fails_with(
        monkeypatch,
        capsys,
        run_copy,
        ["cluster", str(run_copy)],
        f"the states store {run_copy}/states.zarr is damaged: layer_000/x rows 768–1,024 cannot be read (cannot "
        f"reshape array of size {size} into shape (256,32)). Dump again with `lpr-distill dump RUN_DIR --force`.",
    )
    assert not (run_copy / "prototypes").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_states(monkeypatch, capsys, run_copy, value):
    x = zarr.open_array(str(run_copy / "states.zarr" / "layer_000" / "x"), mode="r+")
    rows = x[10:13]
    rows[:, 5] = value
    x[10:13] = rows
    fails_with(
        monkeypatch,
        capsys,
        run_copy,
        ["cluster", str(run_copy)],
        "3 rows of the states contain NaN or Inf. Dump again with --force in a wider dtype (--set "
        "dump.dtype=float32); if the model itself overflows, load it in float32 (--set model.dtype=float32).",
    )


# --- exported routers -----------------------------------------------------------------------


def test_routers_for_another_model(monkeypatch, capsys, tmp_path, run_copy, tiny_model):
    code, _, err = invoke(monkeypatch, capsys, "cluster", str(run_copy))
    assert code == 0, err
    out = tmp_path / "routers"
    code, _, err = invoke(monkeypatch, capsys, "export", str(run_copy), "--init-only", "--out", str(out))
    assert code == 0, err
    other = save_tiny_moe(tmp_path / "mixtral", family="mixtral")
    with pytest.raises(LprError) as caught:
        load_lpr_model(str(other), out)
    message = str(caught.value)
    assert "\n" not in message
    # every difference is listed (family, then e.g. the weight convention); the hint names the right model
    assert message.startswith(f"routers in {out} were made for another model: family qwen3_moe ≠ the model's mixtral")
    assert message.endswith(f". Export routers for this model (they were made for {tiny_model}).")
    load_lpr_model(str(tiny_model), out)  # the right model still loads them


# --- the run directory ----------------------------------------------------------------------


def test_run_directory_not_writable(monkeypatch, capsys, tmp_path, config_file):
    """A run directory that cannot be created: under a regular file (this works as root too, where
    permission bits stop nothing); and, when not root, inside a read-only directory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = blocker / "run"
    fails_with(
        monkeypatch,
        capsys,
        run,
        ["dump", str(run), "--config", str(config_file)],
        f"cannot write {run} (Not a directory). Choose a run directory you can write to, or fix its permissions.",
    )
    if not ROOT:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        fails_with(
            monkeypatch,
            capsys,
            locked / "run",
            ["dump", str(locked / "run"), "--config", str(config_file)],
            f"run directory {locked / 'run'} is not writable. Choose a directory you can write to.",
        )


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk(monkeypatch, capsys, tmp_path, config_file):
    """The dump on a disk that fills up (RLIMIT_FSIZE: no write may grow a file past 12 kB, so the
    first 16 kB chunk of x fails with EFBIG, as it would with ENOSPC): one line, nothing complete,
    no config.yaml left by the failed command; the same command later resumes and finishes."""
    run = tmp_path / "run"
    env = os.environ | {"LPR_DISTILL_QUIET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": os.getcwd()}
    args = [sys.executable, "-c", "from pipeline.cli import run; run()", "dump", str(run), "--config", str(config_file)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, preexec_fn=_file_size_limit(12_000))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: writing the states store failed (File too large). Free disk space or check permissions."
    ]
    assert result.stdout == ""
    assert_untouched(monkeypatch, capsys, run, ({}, None, []))
    code, _, err = invoke(monkeypatch, capsys, "dump", str(run), "--config", str(config_file))
    assert code == 0, err
    assert snapshot(monkeypatch, capsys, run)[0]["dump"]


@pytest.mark.slow
def test_one_line_from_a_real_process(tmp_path, tiny_corpus):
    """The console script in a fresh interpreter: one line on stderr, exit 2; --debug shows the traceback."""
    env = os.environ | {"LPR_DISTILL_QUIET": "1", "PYTHONPATH": os.getcwd()}
    args = [sys.executable, "-m", "pipeline.cli", "dump", str(tmp_path / "run"), "--model", str(tmp_path / "none")]
    result = subprocess.run([*args, "--corpus", str(tiny_corpus)], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: model path {tmp_path / 'none'} does not exist. Pass an existing checkpoint directory or a hub id "
        "as --model."
    ]
    debug = [args[0], "-m", "pipeline.cli", "--debug", *args[3:], "--corpus", str(tiny_corpus)]
    result = subprocess.run(debug, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr and "LprError" in result.stderr


def test_a_missing_extra_is_named_verbatim(monkeypatch, capsys, run_copy):
    """Without matplotlib, validate names the extra that brings it, brackets and all (the terminal's
    markup once swallowed "[eval]" and printed `pip install -e "."`)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    fails_with(
        monkeypatch,
        capsys,
        run_copy,
        ["validate", str(run_copy), "--set", "validate.variants=[original]", "--set", "validate.tasks=[]"],
        'matplotlib is not installed (the report\'s plots need it). Install the eval extra: pip install -e ".[eval]".',
    )
