"""Loading checkpoints and finding routers generically, on tiny models of each supported family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, build_config
from pipeline.errors import LprError
from pipeline.moe.families import FAMILIES
from pipeline.moe.loading import find_routers, load_model, model_identity
from pipeline.stages.dump import run_dump
from storage.rundir import RunDir
from storage.states import StatesReader
from tests.conftest import save_tiny_moe, tiny_run_config


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])  # all: tests/test_families.py
def test_capture_on_each_family(tmp_path, tiny_corpus, family):
    path = save_tiny_moe(tmp_path / family, family=family, num_layers=3)
    model, tokenizer = load_model(ModelConfig(path=str(path)), str(path))
    sites = find_routers(model)
    assert [s.layer_index for s in sites] == [0, 1, 2]
    assert all("gate_proj" not in s.name and "shared_expert_gate" not in s.name for s in sites)
    assert tokenizer.pad_token_id is not None

    cfg = build_config(tiny_run_config(path, tiny_corpus, max_tokens=300))
    run = RunDir(str(tmp_path / f"run-{family}"))
    run.ensure()
    run_dump(cfg=cfg, run=run)
    reader = StatesReader(run.url_of(run.output_path("dump")))
    assert reader.num_rows == 300 and reader.attrs["family"] == family
    assert reader.attrs["weight_convention"] == FAMILIES[family].weights
    x = reader.read_x(reader.layers[-1]).float()
    logits = sites[-1].module(x)[0].detach()
    np.testing.assert_allclose(logits.numpy(), reader.read("logits", layer=reader.layers[-1]), atol=2e-3, rtol=2e-3)


def test_loading_errors(tmp_path):
    with pytest.raises(LprError, match="does not exist"):
        load_model(ModelConfig(), str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LprError, match=r"has no config\.json"):
        load_model(ModelConfig(), str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LprError, match="is not a directory"):
        load_model(ModelConfig(), str(tmp_path / "file"))


def test_identity_changes_with_weights(tmp_path):
    a = save_tiny_moe(tmp_path / "a", seed=0)
    b = save_tiny_moe(tmp_path / "b", seed=1)
    assert model_identity(str(a), None)["hash"] == model_identity(str(a), None)["hash"]
    assert model_identity(str(a), None)["hash"] != model_identity(str(b), None)["hash"]


def test_eval_mode_after_loading(tmp_path):
    path = save_tiny_moe(tmp_path / "m")
    model, _ = load_model(ModelConfig(path=str(path), dtype="bfloat16"), str(path))
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
