"""LPR-init export on a tiny real run: calibrated balance, export → load_lpr_model identical routing,
routers for another model refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import load_lpr_model
from pipeline.errors import LprError
from pipeline.moe.loading import find_routers
from pipeline.router.from_clusters import build_init_routers
from pipeline.stages.export import export_routers
from tests.conftest import clustered_run, save_tiny_moe


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, tiny_model, tiny_corpus):
    return clustered_run(tmp_path_factory.mktemp("export") / "run", tiny_model, tiny_corpus)


def test_init_routers_are_balanced_on_calibration_rows(clustered):
    cfg, run = clustered
    routers, metrics = build_init_routers(cfg, run)
    assert len(routers) == 2
    for layer, m in metrics.items():
        # exact up to near-ties between experts (within the auction's ε), which a bias cannot split
        assert m["slots_max"] - m["slots_min"] <= max(2, 0.02 * 512 * 2 / 4), layer
        assert m["temperature"] > 0


def test_export_then_load_routes_identically(clustered, tmp_path, tiny_model):
    cfg, run = clustered
    routers, metrics = build_init_routers(cfg, run)
    out = export_routers(routers, tmp_path / "routers", cfg=cfg, kind="lpr-init", metrics=metrics)
    assert {p.name for p in out.iterdir()} == {"routers.safetensors", "routers.json", "README.md"}
    assert "load_lpr_model" in (out / "README.md").read_text()
    model = load_lpr_model(str(tiny_model), out)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    for site in find_routers(model):
        expected = routers[site.name].eval()(x)
        got = site.module(x)
        assert torch.equal(got[2], expected[2])
        assert torch.equal(got[1], expected[1])  # bitwise: same device and dtype
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        output = model(ids, labels=ids)
    assert torch.isfinite(output.loss)
    assert json.loads((out / "routers.json").read_text())["kind"] == "lpr-init"


def test_routers_for_another_model_are_refused(clustered, tmp_path):
    cfg, run = clustered
    routers, metrics = build_init_routers(cfg, run)
    out = export_routers(routers, tmp_path / "routers", cfg=cfg, kind="lpr-init", metrics=metrics)
    other = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    with pytest.raises(LprError, match=r"were made for another model: family qwen3_moe ≠ the model's mixtral") as err:
        load_lpr_model(AutoModelForCausalLM.from_pretrained(other), out)
    assert "\n" not in str(err.value)
    deeper = save_tiny_moe(tmp_path / "deeper", "qwen3_moe", num_layers=3)
    with pytest.raises(LprError, match=r"routers for 2 MoE layers ≠ the model's 3"):
        load_lpr_model(str(deeper), out)
    with pytest.raises(LprError, match=r"holds no routers.json"):
        load_lpr_model(str(deeper), tmp_path)


def test_cli_export_init_only(clustered, tmp_path):
    _, run = clustered
    other_model = save_tiny_moe(tmp_path / "wide", "mixtral")  # hidden 32 too: change the experts
    cfg_other = json.loads((other_model / "config.json").read_text())
    cfg_other["num_local_experts"] = 6
    (other_model / "config.json").write_text(json.dumps(cfg_other))
    out = tmp_path / "cli-out"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", run.url, "--init-only", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "routers.safetensors").is_file()
    refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", run.url], capture_output=True, text=True)
    assert refused.returncode == 2 and "--init-only" in refused.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", run.url, "--init-only", "--set", f"model.path={other_model}"],
        capture_output=True,
        text=True,
    )
    # refused at the front door: the states were dumped from another checkpoint than the config names
    assert wrong.returncode == 2 and f"but the config names {other_model} (revision None)" in wrong.stderr, wrong.stderr
    assert np.isfinite(json.loads((out / "routers.json").read_text())["metrics"]["layer_000"]["temperature"])
