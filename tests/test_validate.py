"""The validate stage on a tiny real run: every variant, every metric, the report files, the errors."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from pipeline.config import DistillConfig, build_config
from pipeline.errors import LprError
from pipeline.evaluation.heldout import heldout_sequences, measure
from pipeline.evaluation.report import frontier_dominance, interpolate_ce, pick_winner
from pipeline.evaluation.slices import EMPTY, slices_markdown, worst_slice
from pipeline.evaluation.variants import VARIANTS, VariantSwitcher, check_fit
from pipeline.moe.loading import find_routers, load_model
from pipeline.stages.distill import run_distill
from pipeline.stages.validate import run_validate
from pipeline.testing.tiny_data import make_texts
from storage.report import read_report
from storage.rundir import RunDir
from tests.conftest import clustered_run, save_tiny_moe, tiny_run_config

VALIDATE = {"sequences": 12, "batch_size": 4, "tasks": [], "bias_strengths": [0.0, 0.5, 1.0]}
DISTILL = {"steps": 30, "batch_rows": 128, "buffer_rows": 1024, "eval_every": 10, "val_rows": 512}
# the model-level phase and in-model calibration, kept tiny (keys present only where distill has them)
MODEL_LEVEL = {
    "model_steps": 6,
    "model_batch_sequences": 2,
    "model_val_sequences": 4,
    "model_eval_every": 3,
    "calibration_sequences": 16,
}
DISTILL |= {key: value for key, value in MODEL_LEVEL.items() if key in DistillConfig.model_fields}


@pytest.fixture(scope="module")
def slice_sources(tmp_path_factory) -> dict[str, str]:
    """Two traffic slices: a JSONL file and a folder of plain-text files, each with documents of its own."""
    root = tmp_path_factory.mktemp("slices")
    (root / "chat.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(120, seed=7)))
    (root / "notes").mkdir()
    for i, text in enumerate(make_texts(120, words_per_doc=40, seed=8)):
        (root / "notes" / f"note-{i}").write_text(text)
    return {"chat": str(root / "chat.jsonl"), "notes": str(root / "notes")}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model, tiny_corpus, slice_sources):
    path = tmp_path_factory.mktemp("validate") / "run"
    validate = VALIDATE | {"slices": slice_sources, "slice_sequences": 8, "slice_max_floor": 1.0}
    cfg, run = clustered_run(path, tiny_model, tiny_corpus, distill=DISTILL, validate=validate)
    run_distill(cfg=cfg, run=run)
    return cfg, run


@pytest.fixture(scope="module")
def validated(distilled):
    cfg, run = distilled
    return cfg, run, run_validate(cfg=cfg, run=run)


def png_size(blob: bytes) -> tuple[int, int]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", blob[16:24])


@pytest.mark.slow
def test_report_holds_every_variant_and_metric(validated):
    cfg, run, manifest = validated
    assert run.is_complete("validate")
    report = read_report(run)
    assert list(report["variants"]) == ["original", "original+bias", "lpr-init", "lpr"]
    from pipeline.cli.status import run_status

    details = run_status(run)["stages"]["validate"]["details"]
    winner = report["winner"]["name"]
    assert details.startswith(f"winner {winner}: Gini "), details
    for result in report["variants"].values():
        assert result["cross_entropy"] > 0 and result["perplexity"] == pytest.approx(
            2.718281828 ** result["cross_entropy"]
        )
        assert result["tokens"] == 12 * cfg.corpus.seq_len
        assert len(result["layers"]) == 2
        for layer in result["layers"]:
            for kind in ("slot", "soft"):
                assert set(layer[kind]) == {"gini", "min_max", "cv", "busiest_share", "idle_experts"}
            assert set(layer["overflow"]) == {"1x", "1.25x"}
            assert set(layer["ep_balancedness"]) == {"2", "4", "8"}
            assert layer["ep_balancedness"]["8"] is None  # 4 experts do not split over 8 devices
            assert sum(layer["slot_load"]) == 12 * cfg.corpus.seq_len * 2  # every token's top-2 slots
            assert 0 <= layer["topk_agreement"] <= 1
        mean = result["mean"]
        assert mean["slot"]["gini"] == pytest.approx(sum(layer["slot"]["gini"] for layer in result["layers"]) / 2)
        assert "8" not in mean["ep_balancedness"]
        assert 0 <= mean["slot"]["document_interval"]["noise_gini"] < 1
    assert report["variants"]["original"]["mean"]["topk_agreement"] == 1.0
    # a balancing variant is more even than the untrained gate on held-out text
    original = report["variants"]["original"]["mean"]["slot"]["gini"]
    assert report["variants"]["original+bias"]["mean"]["slot"]["gini"] < original
    assert [p["strength"] for p in report["bias_curve"]] == [0.0, 0.5, 1.0]
    # strength 0 is the original gate, strength 1 the original+bias variant: their measurements are reused
    assert report["bias_curve"][0]["cross_entropy"] == report["variants"]["original"]["cross_entropy"]
    assert report["bias_curve"][-1]["gini"] == report["variants"]["original+bias"]["mean"]["slot"]["gini"]
    assert 0 < report["bias_curve"][1]["gini"] < original  # half strength: measured, between the two
    assert report["winner"]["name"] in report["variants"]
    assert manifest.stats["winner"] == report["winner"]


@pytest.mark.slow
def test_report_files(validated):
    _, run, _ = validated
    directory = run.output_path("validate")
    names = set(run.fs.ls(directory, detail=False))
    for name in ("report.json", "report.md", "load_heatmap.png", "gini_per_layer.png", "frontier.png"):
        assert f"{directory}/{name}" in names
    for name in ("load_heatmap.png", "gini_per_layer.png", "frontier.png"):
        with run.fs.open(f"{directory}/{name}", "rb") as handle:
            width, height = png_size(handle.read())
        assert width > 300 and height > 200
    text = run.read_text(f"{directory}/report.md")
    for variant in ("original", "original+bias", "lpr-init", "lpr"):
        assert f"| {variant} |" in text
    assert "Winner (" in text and "Gini floor (docs)" in text
    json.loads(run.read_text(f"{directory}/report.json"))  # strict JSON (no NaN)


@pytest.mark.slow
def test_report_holds_every_slice_for_every_variant(validated):
    """Per traffic slice and variant: documents, tokens, Gini with its own document floor, min/max, CE
    and Δ CE against the original gate on that slice; report.md names the worst slice."""
    _, run, _ = validated
    report = read_report(run)
    slices = report["slices"]
    assert set(slices["sources"]) == {"chat", "notes"}
    assert list(slices["variants"]) == list(report["variants"])
    for variant, figures in slices["variants"].items():
        assert set(figures) == {"chat", "notes"}
        for f in figures.values():
            assert f["documents"] > 0 and f["tokens"] == 8 * 32
            assert 0 <= f["floor"] < 1 and 0 <= f["gini"] < 1 and 0 <= f["min_max"] <= 1 and f["cross_entropy"] > 0
            assert not f["too_small"]
            assert (f["delta_ce_pct"] == 0) if variant == "original" else f["delta_ce_pct"] is not None
        assert slices["worst"][variant] == worst_slice(figures)
    # the slices were measured on their own documents, not the corpus's held-out set
    assert slices["variants"]["original"]["chat"]["cross_entropy"] != report["variants"]["original"]["cross_entropy"]
    text = run.read_text(f"{run.output_path('validate')}/report.md")
    assert "## Balance per traffic slice" in text and "Worst traffic slice for " in text
    assert "| chat | lpr |" in text and "| notes | original |" in text


def test_a_slice_too_small_to_say_gives_no_figure():
    figures = {
        "big": {
            "documents": 90,
            "tokens": 9000,
            "floor": 0.02,
            "too_small": False,
            "gini": 0.05,
            "min_max": 0.8,
            "cross_entropy": 3.0,
            "delta_ce_pct": 1.0,
        },
        "tiny": {
            "documents": 2,
            "tokens": 300,
            "floor": 0.3,
            "too_small": True,
            "gini": 0.6,
            "min_max": 0.0,
            "cross_entropy": 3.5,
            "delta_ce_pct": 9.0,
        },
    }
    assert worst_slice(figures) == "big"  # tiny's Gini says nothing, however high
    text = "\n".join(slices_markdown({"variants": {"lpr": figures}, "worst": {"lpr": "big"}, "max_floor": 0.1}))
    assert "| tiny | lpr | 2 | 300 | too few documents to say (floor 0.300 > 0.1)" in text
    assert "0.600" not in text
    assert worst_slice({"tiny": figures["tiny"]}) is None
    empty = {"variants": {"lpr": {"none": dict(EMPTY)}}, "worst": {"lpr": None}, "max_floor": 0.1}
    assert "| none | lpr | 0 | 0 | too few documents to say (no full sequence)" in "\n".join(slices_markdown(empty))


@pytest.mark.slow
def test_rerun_is_skipped(validated):
    cfg, run, _ = validated
    assert run_validate(cfg=cfg, run=run).skipped


@pytest.mark.slow
def test_variant_switcher_restores_the_original_gates(distilled):
    cfg, run = distilled
    model, tokenizer = load_model(cfg.model, cfg.model.path)
    held = heldout_sequences(cfg, tokenizer, 4)
    switcher = VariantSwitcher(model)
    before = measure(model, held, cfg=cfg)
    switcher.apply("lpr", cfg, run)
    assert all(type(site.module).__name__.startswith("Lpr") for site in find_routers(model))
    switcher.restore()
    after = measure(model, held, cfg=cfg)
    assert after["cross_entropy"] == before["cross_entropy"]
    assert [site.module for site in find_routers(model)] == list(switcher.originals.values())


def test_heldout_sequences_are_from_heldout_documents(tiny_model, tiny_corpus):
    from pipeline.data.corpus import is_heldout, iter_documents

    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus))
    _, tokenizer = load_model(cfg.model, cfg.model.path)
    held = heldout_sequences(cfg, tokenizer, 3)
    assert held.ids.shape == held.documents.shape == (3, cfg.corpus.seq_len)
    heldout_docs = {i: d.text.split(":")[0] for i, d in iter_documents(cfg.corpus) if is_heldout(d.name, 0.1)}
    seen = set(re.findall(r"document \d+", "".join(tokenizer.decode(row) for row in held.ids)))
    assert seen and seen <= set(heldout_docs.values())  # every document the sequences show is a held-out one
    assert set(held.documents.ravel().tolist()) <= set(heldout_docs)  # and so are the documents they name
    named = {heldout_docs[int(i)] for i in held.documents.ravel()}
    assert seen <= named  # each token's document index names a document the text shows


def test_missing_stage_is_a_one_line_error(tmp_path, tiny_model, tiny_corpus):
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus) | {"validate": VALIDATE})
    with pytest.raises(LprError, match="no complete dump"):
        run_validate(cfg=cfg, run=RunDir(str(tmp_path / "empty")))


@pytest.mark.slow
def test_variant_needing_an_absent_stage_and_unknown_variants(tmp_path, tiny_model, tiny_corpus):
    cfg, run = clustered_run(tmp_path / "run", tiny_model, tiny_corpus, validate=VALIDATE)
    with pytest.raises(LprError, match="no complete distill stage") as err:
        run_validate(cfg=cfg, run=run)
    assert "\n" not in str(err.value)
    cfg.validate.variants = ["original", "lpr-magic"]
    with pytest.raises(LprError, match=r"unknown routing variant.*'lpr-magic'"):
        run_validate(cfg=cfg, run=run)


@pytest.mark.slow
def test_routers_that_do_not_fit_the_model(distilled, tmp_path):
    cfg, run = distilled
    other = save_tiny_moe(tmp_path / "three-layers", num_layers=3)
    model, _ = load_model(cfg.model, str(other))
    routers = VARIANTS["lpr"].build(cfg, run, model).routers
    with pytest.raises(LprError, match="the lpr routers do not fit the model"):
        check_fit("lpr", model, routers)
    bad = build_config(cfg.model_dump() | {"model": {"path": str(other)}})
    with pytest.raises(LprError, match=r"do not fit the model|MoE layers"):
        run_validate(cfg=bad, run=run, force=True)


def test_winner_and_interpolation():
    def result(ce: float, gini: float) -> dict:
        return {"cross_entropy": ce, "mean": {"slot": {"gini": gini}}}

    variants = {"original": result(3.9, 0.3), "original+bias": result(3.95, 0.05), "lpr": result(3.99, 0.05)}
    winner = pick_winner(variants, max_gini=0.1)
    assert winner["name"] == "original+bias" and winner["is_baseline"] and "A baseline wins" in winner["sentence"]
    assert pick_winner(variants | {"lpr": result(3.92, 0.04)}, max_gini=0.1)["name"] == "lpr"
    assert pick_winner(variants, max_gini=0.01)["name"] in ("original+bias", "lpr")  # none eligible: most balanced
    curve = [{"gini": 0.3, "cross_entropy": 3.9}, {"gini": 0.1, "cross_entropy": 4.0}]
    assert interpolate_ce(curve, 0.2) == pytest.approx(3.95)
    assert interpolate_ce(curve, 0.05) is None
    # a bias pushed past balance turns back (more uneven and worse): not on the baseline's frontier
    overshoot = [*curve, {"gini": 0.15, "cross_entropy": 4.05}]
    assert interpolate_ce(overshoot, 0.12) == pytest.approx(3.99)


def test_frontier_dominance_names_the_points_each_curve_beats():
    def point(label: str, gini: float, ce: float) -> dict:
        return {"label": label, "gini": gini, "cross_entropy": ce}

    bias = [point("0", 0.35, 4.00), point("0.5", 0.17, 4.01), point("1", 0.06, 4.05), point("1.25", 0.09, 4.08)]
    lpr = [point("0", 0.05, 4.04), point("0.5", 0.04, 4.06), point("1", 0.03, 4.50)]
    result = frontier_dominance(lpr, bias, base=4.0)
    # lpr 0 is more even and cheaper than bias 1 and 1.25; nothing of lpr's beats bias 0 or 0.5 on both axes
    assert result["bias_beaten_by_lpr"] == ["1", "1.25"]
    assert result["lpr_beaten_by_bias"] == []
    assert "only LPR goes: 3 settings, the cheapest (balance 0) at Gini 0.050 for +1.00 % CE" in result["sentence"]
    # a bias point that is both more even and cheaper beats an LPR setting; an equal point beats nothing
    result = frontier_dominance([point("0", 0.07, 4.06), point("1", 0.06, 4.05)], bias, base=4.0)
    assert result["lpr_beaten_by_bias"] == ["0"] and result["bias_beaten_by_lpr"] == ["1.25"]
    assert "only LPR goes" not in result["sentence"]


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str], max_length: int) -> list[float]:
    """Sum of log-probabilities of each choice after the context, tokenised and truncated (last
    ``max_length`` inputs) the way lm-eval does it."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    scores = []
    for choice in choices:
        whole = tokenizer(context + choice, add_special_tokens=False).input_ids
        n = len(whole) - len(context_ids)  # continuation tokens
        window = whole[-(max_length + 1) :]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), dim=-1)
        targets = torch.tensor(window[-n:])
        scores.append(float(logprobs[torch.arange(len(window) - 1 - n, len(window) - 1), targets].sum()))
    return scores


@pytest.mark.slow
def test_local_task_runs_through_lm_eval(distilled):
    """The shipped task through the real harness, on the in-memory model with LPR routers in place:
    lm-eval's accuracy equals our own scoring of the same items with the same model."""
    from pipeline.evaluation.downstream import evaluate_tasks, local_tasks

    cfg, run = distilled
    model, tokenizer = load_model(cfg.model, cfg.model.path)
    VariantSwitcher(model).apply("lpr", cfg, run)
    limit = 24
    results = evaluate_tasks(model, tokenizer, ["lpr_demo_cloze"], batch_size=8, limit=limit, max_length=256)
    task = results["lpr_demo_cloze"]
    assert task["samples"] == limit and 0 <= task["acc"] <= 1 and task["acc_stderr"] > 0
    data = local_tasks()["lpr_demo_cloze"]["dataset_kwargs"]["data_files"]["test"]
    with open(data, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle.readlines()[:limit]]
    ours = []
    for row in rows:
        scores = choice_loglikelihoods(model, tokenizer, row["context"], row["choices"], max_length=256)
        ours.append(max(range(4), key=scores.__getitem__) == row["label"])
    assert abs(sum(ours) - task["acc"] * limit) <= 1, (sum(ours), task["acc"] * limit)


@pytest.mark.slow
def test_unknown_lm_eval_task_is_a_one_line_error(distilled):
    from pipeline.evaluation.downstream import evaluate_tasks

    cfg, _ = distilled
    model, tokenizer = load_model(cfg.model, cfg.model.path)
    with pytest.raises(LprError, match="lm-eval knows no task 'no_such_task'"):
        evaluate_tasks(model, tokenizer, ["no_such_task"], batch_size=4, limit=2, max_length=64)


@pytest.mark.slow
def test_sweep_distils_each_setting_apart_and_feeds_the_report(distilled):
    from pipeline.stages.sweep import run_sweep, setting_run

    cfg, run = distilled
    before = {stage: run.read_manifest(stage).fingerprint for stage in ("dump", "cluster", "distill")}
    results = run_sweep(cfg=cfg, run=run, balances=[0.0, 1.0])
    assert [p["balance"] for p in results["lpr"]] == [0.0, 1.0]
    assert [p["strength"] for p in results["bias"]] == cfg.validate.bias_strengths
    assert set(results["points"]) == {"original", "lpr-init", "lpr"}
    for balance in (0.0, 1.0):
        sub = setting_run(run, balance)
        assert sub.is_complete("distill") and sub.read_manifest("distill").config["distill"]["balance"] == balance
        assert run.fs.exists(sub.path("routers")) and not run.fs.exists(sub.path("states.zarr"))
    # the parent's stages are untouched, and a second sweep reuses the settings' routers
    assert {stage: run.read_manifest(stage).fingerprint for stage in before} == before
    assert run_sweep(cfg=cfg, run=run, balances=[0.0, 1.0])["lpr"] == results["lpr"]
    with run.fs.open(run.path("sweep", "frontier.png"), "rb") as handle:
        assert png_size(handle.read())[0] > 300
    # the report now carries LPR's curve, and validate is redone (its inputs changed)
    manifest = run_validate(cfg=cfg, run=run)
    assert not manifest.skipped
    report = read_report(run)
    assert [p["balance"] for p in report["lpr_sweep"]] == [0.0, 1.0]
    assert report["frontier"] == results["dominance"]  # the same comparison, in the report and the sweep


@pytest.mark.slow
def test_cli_validate_prints_the_table_and_errors_in_one_line(distilled, monkeypatch, capsys, tmp_path):
    from tests.test_cli import assert_one_line_error, invoke

    cfg, run = distilled
    code, out, err = invoke(monkeypatch, capsys, "validate", run.url, "--variants", "original,lpr", "--tasks", "")
    assert code == 0, err
    assert "original" in out and "lpr" in out and "Winner (" in out and "report/report.md" in out
    assert "90 % docs" in out and "floor" in out  # the document-bootstrap interval of the Gini, its noise floor
    assert list(read_report(run)["variants"]) == ["original", "lpr"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke(monkeypatch, capsys, "validate", str(empty), "--set", f"model.path={cfg.model.path}")
    assert_one_line_error(code, err, "no complete dump")
