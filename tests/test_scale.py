"""The scale benchmark's parts: the geometries against the published model sizes, the extrapolation, the
filled store, the stage timers; and the held-out rows the gate-level phase reads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from scale_geometries import GEOMETRIES, build_config, head_flops, layer_flops, model_bytes
from scale_plan import extrapolate
from scale_stages import Timers, fill_store

from pipeline.config import build_config as run_config
from pipeline.moe.families import FAMILIES
from pipeline.stages.distill import first_rows

# published totals (model cards): all weights and the weights active per token, in billions, and whether
# that active count includes the input embedding (gpt-oss's card leaves it out)
PUBLISHED = {
    "qwen3-30b-a3b": (30.5, 3.3, True),
    "olmoe-1b-7b": (6.9, 1.3, True),
    "mixtral-8x7b": (46.7, 12.9, True),
    "gpt-oss-20b": (20.9, 3.6, False),
    "deepseek-v3": (671, 37, True),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_matches_the_published_model_size(name):
    g = GEOMETRIES[name]
    total, active, embedding = PUBLISHED[name]
    assert model_bytes(g) / 2 / 1e9 == pytest.approx(total, rel=0.02)
    # active: the layers' share of the forward FLOPs, the head, and the embedding row each token reads
    dense = (model_bytes(g) - model_bytes(g, layers=g.moe_layers)) / 2  # DeepSeek-V3's dense layers
    per_token = (g.moe_layers * layer_flops(g) + (1 + embedding) * head_flops(g)) / 2 + dense
    assert per_token / 1e9 == pytest.approx(active, rel=0.1)


class _Tokenizer:
    pad_token_id, eos_token_id = 1, 0


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_the_built_config_has_the_published_widths(name):
    g = GEOMETRIES[name]
    config = build_config(g, layers=2, tokenizer=_Tokenizer())
    family = FAMILIES[config.model_type]
    assert (config.hidden_size, config.vocab_size, config.num_hidden_layers) == (g.hidden, g.vocab, 2)
    assert (family.num_experts(config), family.num_top_k(config)) == (g.experts, g.top_k)


def _result(tokens: int, seconds: float = 10.0) -> dict:
    stage = {"seconds": seconds, "peak_rss_mib": 1.0, "bytes": 4_000 * tokens, "timers": {}}
    timed = {"load": {"seconds": 1.0}, "train": {"seconds": 5.0}, "calibrate": {"seconds": 2.0}}
    stages = {name: dict(stage) for name in ("dump", "cluster", "distill-gate", "export")}
    stages |= {name: stage | {"timers": timed} for name in ("distill-model", "validate")}
    stages["dump"] |= {"loop_seconds": seconds}
    stages["cluster-sample"] = stage | {"seconds_per_layer": 5.0}
    return {"geometry": "olmoe-1b-7b", "layers": 2, "tokens": tokens, "stages": stages}


def test_extrapolation_scales_with_the_work():
    bench = run_config({"dump": {"max_tokens": 1024}})
    small, large = extrapolate(_result(1024), bench), extrapolate(_result(2048), bench)
    assert small["hours"]["dump"] > 0 and small["moe_layers"] == 16
    assert large["hours"]["dump"] == pytest.approx(small["hours"]["dump"] / 2, rel=0.05)  # same time, 2x the tokens
    assert small["hours"]["cluster"] == pytest.approx(5.0 * 16 / 3600, abs=0.01)
    assert small["states_gb"] == pytest.approx(262_144 * (16 + 16 * (4_000 - 16) / 2) / 1e9, rel=0.01)


def test_timers_count_nested_calls_apart():
    import types

    owner = types.SimpleNamespace(outer=lambda f: f(), inner=lambda: 1)
    timers = Timers()
    timers.wrap(owner, "outer", "train")
    timers.wrap(owner, "inner", "calibrate")
    owner.outer(owner.inner)
    owner.inner()
    figures = timers.as_dict()
    assert figures["calibrate"]["calls"] == 2 and figures["train>calibrate"]["calls"] == 1


def test_filled_store_keeps_the_dumped_rows_and_adds_noisy_copies(tmp_path):
    from storage.states import StatesReader, StatesWriter, StoreLayout

    modules = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    layout = StoreLayout(modules, [0, 1], 16, 4, 2, "float16", 64, "none")
    source = str(tmp_path / "source.zarr")
    writer = StatesWriter.create(source, layout=layout, attrs={"family": "qwen3_moe"}, fingerprint="f")
    rng = np.random.default_rng(0)
    n = 100
    layers = []
    for _ in range(2):
        logits = torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32))
        weights, indices = logits.softmax(-1).topk(2, -1)
        x = torch.from_numpy(rng.normal(size=(n, 16)).astype(np.float16))
        layers.append({"x": x, "logits": logits, "topk_idx": indices.to(torch.int16), "topk_w": weights})
    shared = {"token_id": np.arange(n, dtype=np.int32), "doc_id": np.arange(n) // 10, "position": np.zeros(n, np.int32)}
    writer.append(shared, layers, 1)
    writer.finish({})
    report = fill_store(source, str(tmp_path / "filled.zarr"), rows=250, seed=0)
    filled = StatesReader(str(tmp_path / "filled.zarr"))
    assert report == {"rows": 250, "source_rows": n} and filled.num_rows == 250 and filled.layers == ["layer_000"]
    np.testing.assert_array_equal(filled.read_x("layer_000", 0, n), layers[0]["x"].numpy())
    extra = filled.read_x("layer_000", n).float()
    assert torch.isfinite(extra).all() and extra.std() == pytest.approx(1.0, rel=0.1)
    assert filled.read("topk_idx", n, layer="layer_000").max() < 4


def test_first_rows_cut_the_ranges():
    assert first_rows([(0, 10), (20, 30), (40, 50)], 15) == [(0, 10), (20, 25)]
    assert first_rows([(0, 10)], 50) == [(0, 10)]
    assert first_rows([(0, 10), (20, 30)], 10) == [(0, 10)]


def test_the_planning_table_is_the_saved_benchmark_runs(tmp_path):
    """docs/planning.md is what `scale.py --table` writes from benchmarks/results/ (no figure edited by hand)."""
    from scale_plan import load_results, write_table

    root = Path(__file__).resolve().parent.parent
    write_table(load_results(root / "benchmarks" / "results"), tmp_path / "planning.md")
    assert (tmp_path / "planning.md").read_text() == (root / "docs" / "planning.md").read_text()
