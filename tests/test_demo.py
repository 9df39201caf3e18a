"""The demo path end to end on a miniature demo config: build, cache, reload, dump."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from pipeline import cli
from pipeline.config import DemoConfig
from pipeline.demo.architecture import per_layer_balance_loss
from pipeline.demo.model import REPORT_NAME, demo_model_dir, ensure_demo_model

pytestmark = pytest.mark.slow

MINI = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_experts": 4,
    "top_k": 2,
    "expert_width": 16,
    "num_heads": 2,
    "vocab_size": 320,
    "corpus_chars": 150_000,
    "seq_len": 64,
    "batch_size": 4,
    "train_steps": 3,
    "eval_sequences": 8,
}


def test_build_cache_and_reload(tmp_path):
    cfg = DemoConfig(**MINI, cache_dir=str(tmp_path))
    path = ensure_demo_model(cfg, seed=0)
    assert path == demo_model_dir(cfg, seed=0)
    report = json.loads((path / REPORT_NAME).read_text())
    assert 1 <= report["heldout_documents"] <= 8 and len(report["trained"]["layers"]) == 2
    assert report["trained"]["perplexity"] < report["untrained"]["perplexity"]
    started = time.time()
    assert ensure_demo_model(cfg, seed=0) == path and time.time() - started < 1  # cached: no rebuild
    assert not list(tmp_path.glob("*.tmp-*"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4


def test_collapsed_variant_and_family_are_different_models(tmp_path):
    a = DemoConfig(**MINI, cache_dir=str(tmp_path))
    b = DemoConfig(**MINI, cache_dir=str(tmp_path), variant="collapsed")
    c = DemoConfig(**MINI | {"num_experts": 8}, cache_dir=str(tmp_path), family="deepseek_v3")
    assert demo_model_dir(a, seed=0) != demo_model_dir(b, seed=0) != demo_model_dir(a, seed=1)
    assert demo_model_dir(c, seed=0).name.startswith("demo-deepseek_v3-balanced-")
    assert demo_model_dir(a, seed=0).name.startswith("demo-balanced-")  # the cache key models were built under
    with pytest.raises(ValueError, match="multiple of 4"):
        DemoConfig(**MINI, family="deepseek_v3")


def test_switch_loss_is_per_layer():
    low = torch.tensor([[5.0, 5.0, 0, 0]]).repeat(8, 1)  # layer A: everything to experts 0 and 1
    high = torch.tensor([[0, 0, 5.0, 5.0]]).repeat(8, 1)  # layer B: everything to experts 2 and 3
    record = [(logits, logits.topk(2, -1).indices) for logits in (torch.cat([low, high]), low, high)]
    pooled = per_layer_balance_loss(record[:1], "softmax")  # what pooling all layers sees
    separate = per_layer_balance_loss(record[1:], "softmax")
    assert pooled.item() == pytest.approx(1.0, abs=1e-3)  # pooled: looks perfectly balanced
    assert separate.item() > 1.9  # per layer: both collapsed


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_demo_command_runs_every_stage_with_the_native_routers(family, tmp_path, monkeypatch, capsys):
    """Both demo families, every stage; the report holds the drop-in `native` routers beside the LPR (distilled
    into forms/native, since the demo's cosine LPRs do not fold)."""
    mini = MINI | ({"num_experts": 8, "num_layers": 3} if family == "deepseek_v3" else {})  # a dense first layer
    sets = [f"demo.{k}={v}" for k, v in mini.items()]
    sets += [
        f"demo.cache_dir={tmp_path / 'cache'}",
        "dump.max_tokens=2000",
        "corpus.seq_len=64",
        "corpus.demo_max_chars=150000",
        "distill.calibration_sequences=256",
        "dump.batch_tokens=512",
        # every stage runs; few steps (the quick start in CI runs the demo at its defaults)
        "distill.steps=40",
        "distill.eval_every=20",
        "distill.model_steps=4",
        "distill.model_eval_every=2",
        "validate.tasks=[]",
    ]
    argv = ["lpr-distill", "demo", "--run-dir", str(tmp_path / "run"), "--family", family]
    for s in sets:
        argv += ["--set", s]
    monkeypatch.setattr(sys, "argv", argv)
    cli.run()
    monkeypatch.setattr(sys, "argv", ["lpr-distill", "status", str(tmp_path / "run"), "--json"])
    capsys.readouterr()
    cli.run()
    status = json.loads(capsys.readouterr().out)["stages"]["dump"]
    assert status["complete"] and status["states"]["rows"] == 2000
    assert set(status["states"]["layers"]) == (
        {"layer_001", "layer_002"} if family == "deepseek_v3" else {"layer_000", "layer_001"}
    )
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert list(report["variants"]) == ["original", "original+bias", "lpr-init", "lpr", "native"]
    assert report["variants"]["native"]["build"]["run"] == str(tmp_path / "run" / "forms" / "native")
    assert report["native"]["native_gini"] == report["variants"]["native"]["mean"]["slot"]["gini"]


def test_balance_weight_schedule():
    from pipeline.demo.model import balance_weight

    cfg = DemoConfig(train_steps=100, balance_coef=0.005, balance_coef_start=0.02)
    assert balance_weight(cfg, 0) == pytest.approx(0.02)
    assert balance_weight(cfg, 25) == pytest.approx(0.0125)
    assert balance_weight(cfg, 50) == balance_weight(cfg, 99) == pytest.approx(0.005)
    assert balance_weight(DemoConfig(variant="collapsed"), 0) == 0.0
