"""The dump stage on a tiny real Qwen3-MoE: row counts, fidelity to the router, skip, force, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import build_config
from pipeline.data.corpus import iter_documents, iter_packed, split_documents
from pipeline.moe.loading import find_routers, load_model
from pipeline.stages.dump import run_dump
from storage.rundir import RunDir
from storage.states import StatesReader
from tests.conftest import tiny_run_config


def _dump(tmp_path, tiny_model, tiny_corpus, name="run", **dump):
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus, **dump))
    run = RunDir(str(tmp_path / name))
    run.ensure()
    return cfg, run, run_dump(cfg=cfg, run=run)


def test_rows_equal_non_padding_tokens(tmp_path, tiny_model, tiny_corpus):
    cfg, run, manifest = _dump(tmp_path, tiny_model, tiny_corpus)
    _, tokenizer = load_model(cfg.model, str(tiny_model))
    docs = list(
        split_documents(iter_documents(cfg.corpus), split="train", heldout_fraction=cfg.corpus.heldout_fraction)
    )
    seqs = list(iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.corpus.seq_len, max_tokens=None))
    assert len(seqs[-1].ids) < cfg.corpus.seq_len  # the last batch really is padded
    expected_ids = np.concatenate([s.ids for s in seqs])
    expected_docs = np.concatenate([s.doc_ids for s in seqs])
    expected_pos = np.concatenate([np.arange(len(s.ids)) for s in seqs])

    reader = StatesReader(run.url_of(run.output_path("dump")))
    assert reader.num_rows == len(expected_ids) == manifest.outputs["rows"]
    np.testing.assert_array_equal(reader.read("token_id"), expected_ids)
    np.testing.assert_array_equal(reader.read("doc_id"), expected_docs)
    np.testing.assert_array_equal(reader.read("position"), expected_pos)
    assert len(reader.layers) == 2
    for layer in reader.layers:
        for name in ("x", "logits", "topk_idx", "topk_w"):
            assert reader.group[f"{layer}/{name}"].shape[0] == reader.num_rows
    held = {i for i, _ in split_documents(iter_documents(cfg.corpus), split="heldout", heldout_fraction=0.1)}
    assert held and not held & set(np.unique(reader.read("doc_id")).tolist())


def test_router_recomputed_on_stored_x_reproduces_decisions(tmp_path, tiny_model, tiny_corpus):
    cfg, run, _ = _dump(tmp_path, tiny_model, tiny_corpus)
    model, _ = load_model(cfg.model, str(tiny_model))
    reader = StatesReader(run.url_of(run.output_path("dump")))
    for site, layer in zip(find_routers(model), reader.layers, strict=True):
        assert reader.layer_module(layer) == site.name
        x = reader.read_x(layer).float()
        with torch.no_grad():
            logits, weights, idx = site.module(x)
        stored_logits = reader.read("logits", layer=layer)
        stored_idx = reader.read("topk_idx", layer=layer)
        # x is stored in float16: logits agree to float16 precision
        np.testing.assert_allclose(logits.numpy(), stored_logits, atol=2e-3, rtol=2e-3)
        same = (np.sort(idx.numpy(), 1) == np.sort(stored_idx, 1)).all(1)
        assert same.mean() >= 0.999
        # where they differ, the two experts tie within float16 rounding
        gap = np.abs(np.take_along_axis(stored_logits, stored_idx.astype(np.int64), 1)[:, -1:] - stored_logits)
        for row in np.flatnonzero(~same):
            assert np.sort(gap[row])[1] < 1e-2
        np.testing.assert_allclose(weights.numpy()[same], reader.read("topk_w", layer=layer)[same], atol=2e-3)


def test_rerun_is_skipped_and_force_redoes(tmp_path, tiny_model, tiny_corpus):
    cfg, run, first = _dump(tmp_path, tiny_model, tiny_corpus, max_tokens=500)
    again = run_dump(cfg=cfg, run=run)
    assert again.skipped and again.finished_at == first.finished_at
    forced = run_dump(cfg=cfg, run=run, force=True)
    assert not forced.skipped and forced.outputs["rows"] == 500
    changed = build_config(tiny_run_config(cfg.model.path, cfg.corpus.source, max_tokens=300))
    assert run_dump(cfg=changed, run=run).outputs["rows"] == 300


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_storage_dtypes_keep_the_bits(tmp_path, tiny_model, tiny_corpus, dtype):
    cfg, run, _ = _dump(tmp_path, tiny_model, tiny_corpus, max_tokens=200, dtype=dtype)
    reader = StatesReader(run.url_of(run.output_path("dump")))
    x = reader.read_x(reader.layers[0])
    assert x.dtype == getattr(torch, dtype)
    model, _ = load_model(cfg.model, str(tiny_model))
    site = find_routers(model)[0]
    logits = site.module(x.float())[0].detach().numpy()
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(logits, reader.read("logits", layer=reader.layers[0]), atol=tol, rtol=tol)


def test_codecs_round_trip(tmp_path, tiny_model, tiny_corpus):
    _, run_a, _ = _dump(tmp_path, tiny_model, tiny_corpus, name="a", max_tokens=300, codec="none")
    _, run_b, _ = _dump(tmp_path, tiny_model, tiny_corpus, name="b", max_tokens=300, codec="lz4")
    a = StatesReader(run_a.url_of(run_a.output_path("dump")))
    b = StatesReader(run_b.url_of(run_b.output_path("dump")))
    np.testing.assert_array_equal(a.read("x", layer="layer_001"), b.read("x", layer="layer_001"))
