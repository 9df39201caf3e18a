"""llama.cpp, an engine no one here wrote, serves a drop-in checkpoint with the rebalanced routing.

A DeepSeek-V3-style demo model (sigmoid router, choice bias, grouped top-k; smaller than
``lpr-distill demo --family deepseek_v3`` builds, so that it trains in about a minute) is distilled with
``router.form: native``, exported with ``export --checkpoint``, converted to f32 GGUF by llama.cpp's own
converter and run by llama.cpp; its next-token logits are compared with transformers' stock
``from_pretrained`` of the same directory, and with the original model's.

Needs the ``llama-cpp-python`` binding and llama.cpp's source tree in ``$LLAMA_CPP_SOURCE`` (the
``engine`` step of ``.ci/run`` builds both from PyPI's sdist); skipped without them.
"""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config import build_config, to_yaml
from pipeline.evaluation.heldout import heldout_sequences
from pipeline.moe.loading import load_tokenizer, resolve_model_path
from pipeline.stages.cluster import run_cluster
from pipeline.stages.distill import run_distill
from pipeline.stages.dump import run_dump
from pipeline.stages.export_checkpoint import run_export_checkpoint
from pipeline.testing.llama_cpp import SOURCE_ENV, engine_check, llama_cpp_source
from storage.rundir import RunDir

pytestmark = [
    pytest.mark.engine,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get(SOURCE_ENV),  # once it is set (CI's engine step), a missing engine fails the tests
        reason=f"needs llama.cpp's source tree in ${SOURCE_ENV} and llama-cpp-python (.ci/run's engine step)",
    ),
]

SMALL_DEMO = {
    "family": "deepseek_v3",
    "hidden_size": 128,
    "num_layers": 3,  # a dense first layer, then two MoE layers
    "expert_width": 128,
    "train_steps": 150,
    "corpus_chars": 2_000_000,
    "seq_len": 128,
    "eval_sequences": 32,
}
TOKENS = 128


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the llama.cpp figures, the run's native distil summary) for the small DeepSeek-V3-style demo."""
    source = llama_cpp_source()
    assert source is not None, f"${SOURCE_ENV} does not hold llama.cpp's source tree (no conversion/ in it)"
    import llama_cpp  # noqa: F401  (the binding must be installed: an ImportError fails here)

    root = tmp_path_factory.mktemp("llama_cpp")
    cfg = build_config(
        {
            "model": {"path": "demo"},
            "corpus": {"source": "demo", "seq_len": 128, "demo_max_chars": 1_000_000},
            "demo": SMALL_DEMO,
            "dump": {"max_tokens": 60_000},
            "router": {"form": "native"},
            "distill": {"model_steps": 40, "calibration_sequences": 256, "model_val_sequences": 8},
        }
    )
    run = RunDir(str(root / "run"))
    run.ensure()
    run.write_config(to_yaml(cfg))
    for stage in (run_dump, run_cluster, run_distill):
        stage(cfg=cfg, run=run)
    written = run_export_checkpoint(cfg=cfg, run=run, out=root / "checkpoint")
    model_dir = resolve_model_path(cfg)
    held = heldout_sequences(cfg, load_tokenizer(cfg.model, model_dir), 1)
    ids = [int(i) for i in held.ids[0][:TOKENS]]
    figures = engine_check(source, model_dir, root / "checkpoint", ids, root / "gguf")
    print(json.dumps(figures | {"form": written["form"]}))
    return figures, written


def test_the_checkpoint_carries_weight_and_choice_bias(served):
    _, written = served
    assert written["form"] == "weight + choice bias"


def test_llama_cpp_serves_the_rebalanced_routing(served):
    """At (nearly) every position llama.cpp computes what transformers computes for the exported checkpoint,
    far closer than the routers moved the logits; a rare near-tie expert choice may go the other way."""
    figures, _ = served
    gap = figures["gap"]["transformers_max_abs_diff"]
    assert gap > 0.5, figures  # the rebalanced routing changes the logits
    exported = figures["exported"]
    assert exported["position_max_median"] < 0.01 * gap, figures
    assert exported["argmax_agreement"] >= 0.98, figures
    assert figures["positions_closer_to_rebalanced"] >= 0.95, figures


def test_llama_cpp_serves_the_original_too(served):
    figures, _ = served
    original = figures["original"]
    assert original["position_max_median"] < 0.01 * figures["gap"]["transformers_max_abs_diff"], figures
    assert original["argmax_agreement"] >= 0.98, figures
