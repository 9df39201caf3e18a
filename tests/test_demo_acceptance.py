"""Acceptance checks on the real demo model (builds it once: ~8 minutes on 2 cores).

Not part of CI (``-m "not demo"``); run with ``python -m pytest -m demo``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pipeline import cli
from pipeline.config import RunConfig
from pipeline.data.corpus import iter_documents, iter_packed, split_documents
from pipeline.demo.model import REPORT_NAME, ensure_demo_model
from pipeline.moe.loading import find_routers, load_model
from storage.states import LAYER_ARRAYS, StatesReader

pytestmark = [pytest.mark.demo, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_path():
    return ensure_demo_model(RunConfig().demo, seed=0)


def test_demo_model_is_imbalanced_but_alive(demo_path):
    report = json.loads((demo_path / REPORT_NAME).read_text())
    trained = report["trained"]
    assert report["heldout_documents"] >= 100
    assert 0.2 <= trained["mean_gini"] <= 0.5
    assert trained["min_fair_share"] >= 0.01  # no expert of any layer is dead
    assert trained["perplexity"] <= 0.5 * report["untrained"]["perplexity"]


def test_demo_dump_is_complete_and_faithful(demo_path, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["lpr-distill", "demo", "--run-dir", str(run_dir)])
    cli.run()
    cfg = RunConfig()
    model, tokenizer = load_model(cfg.model, str(demo_path))
    docs = list(
        split_documents(iter_documents(cfg.corpus), split="train", heldout_fraction=cfg.corpus.heldout_fraction)
    )
    fed = sum(len(s.ids) for s in iter_packed(docs, tokenizer=tokenizer, seq_len=256, max_tokens=cfg.dump.max_tokens))
    reader = StatesReader(str(run_dir / "states.zarr"))
    sites = find_routers(model)
    assert reader.num_rows == fed and len(reader.layers) == len(sites) == model.config.num_hidden_layers
    for site, layer in zip(sites, reader.layers, strict=True):
        for name in LAYER_ARRAYS:
            assert reader.group[f"{layer}/{name}"].shape[0] == fed
        x = reader.read_x(layer).float()
        logits, _, idx = site.module(x)
        stored = reader.read("logits", layer=layer)
        np.testing.assert_allclose(logits.detach().numpy(), stored, atol=5e-3, rtol=5e-3)
        same = (np.sort(idx.numpy(), 1) == np.sort(reader.read("topk_idx", layer=layer), 1)).all(1)
        assert same.mean() >= 0.999
    # the cluster stage: exactly balanced slots in every layer, clusters that agree with the experts
    for layer in reader.layers:
        meta = json.loads((run_dir / "prototypes" / f"{layer}.json").read_text())
        assert meta["kmeans"]["size_max"] - meta["kmeans"]["size_min"] <= 1
        assert meta["matching"]["matched_share"] >= 2 * meta["matching"]["chance_share"]
    assert json.loads((run_dir / "manifests" / "distill.json").read_text())["outputs"]["layers"] == reader.layers
