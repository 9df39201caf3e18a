"""Tiny real models and corpora the tests build themselves (no network, seconds each)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts

os.environ.setdefault("LPR_DISTILL_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


def save_tiny_moe(path: Path, family: str = "qwen3_moe", *, seed: int = 0, num_layers: int = 2) -> Path:
    """A randomly initialised MoE checkpoint (hidden 32, 4 experts, top-2) with a BPE tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(make_texts(40))
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    per_family = {
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
        "qwen2_moe": dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        ),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2),
        "qwen3": dict(head_dim=8),  # dense
    }[family]
    config = AutoConfig.for_model(family, **common, **per_family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of 60 short documents."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(60, seed=1)))
    return path


def tiny_run_config(model: Path, corpus: Path, **dump) -> dict:
    return {
        "model": {"path": str(model)},
        "corpus": {"source": str(corpus), "seq_len": 32},
        "dump": {"max_tokens": None, "batch_tokens": 128, "chunk_rows": 256} | dump,
    }


def clustered_run(path: Path, model: Path, corpus: Path, **sections: dict):
    """A run directory with its config saved (as the CLI does), dumped and clustered on the tiny
    model; ``sections`` add to the small cluster/router settings. Returns (cfg, run)."""
    from pipeline.config import build_config, to_yaml
    from pipeline.stages.cluster import run_cluster
    from pipeline.stages.dump import run_dump
    from storage.rundir import RunDir

    cfg = build_config(
        tiny_run_config(model, corpus)
        | {"cluster": {"latent_dim": 8, "iterations": 5}, "router": {"calibration_rows": 512}}
        | sections
    )
    run = RunDir(str(path))
    run.ensure()
    run.write_config(to_yaml(cfg))  # later commands read the model from it
    run_dump(cfg=cfg, run=run)
    run_cluster(cfg=cfg, run=run)
    return cfg, run


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real Prefect server for the session (`prefect server start` on 127.0.0.1, its own PREFECT_HOME)."""
    home = tmp_path_factory.mktemp("prefect-home")
    from tests.prefect_server import prefect_server

    with prefect_server(home) as info:
        if "prefect" in sys.modules:  # imported before the environment pointed at this server
            from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

            with temporary_settings({PREFECT_API_URL: info["url"], PREFECT_HOME: str(home)}):
                yield info
        else:
            yield info
        if "prefect" in sys.modules:  # send the last logs and events while the server is still up
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
