"""The pipeline on a CUDA GPU: every stage on a tiny Qwen3-MoE in bfloat16, FAISS on the GPU, device_map.

Skipped without CUDA (``pytest -m gpu`` selects them; ``scripts/gpu_check.sh`` runs them on a GPU
machine). One module-scoped run goes through dump → cluster → distill (gate level, then model level
and the in-model calibration) → validate → export on ``cuda`` with the model in bfloat16; the tests
check what each stage left, against the same dump on the CPU in float32 where that makes sense.
Routers stay float32 in a bfloat16 model (what ``install_routers`` does; checked here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import tiny_run_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = {
    "cluster": {"latent_dim": 8, "iterations": 5},
    "router": {"calibration_rows": 512},
    "distill": {
        "steps": 20,
        "batch_rows": 64,
        "buffer_rows": 256,
        "eval_every": 10,
        "val_rows": 64,
        "model_steps": 4,
        "model_batch_sequences": 2,
        "model_val_sequences": 2,
        "model_eval_every": 2,
        "model_calibration_sequences": 4,
        "calibration_sequences": 8,
    },
    "validate": {"tasks": [], "sequences": 8, "batch_size": 4, "bias_strengths": [0.0, 1.0]},
}


def _config(model, corpus, **model_section):
    from pipeline.config import build_config

    data = tiny_run_config(model, corpus) | SMALL
    data["model"] |= model_section
    return build_config(data)


def _run(path, cfg):
    from pipeline.config import to_yaml
    from storage.rundir import RunDir

    run = RunDir(str(path))
    run.ensure()
    run.write_config(to_yaml(cfg))
    return run


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_model, tiny_corpus):
    """(cfg, run, manifests by stage, export path): the whole pipeline on cuda, model in bfloat16."""
    from pipeline.stages.cluster import run_cluster
    from pipeline.stages.distill import run_distill
    from pipeline.stages.dump import run_dump
    from pipeline.stages.export import run_export
    from pipeline.stages.validate import run_validate

    cfg = _config(tiny_model, tiny_corpus, device="cuda", dtype="bfloat16")
    run = _run(tmp_path_factory.mktemp("gpu-run"), cfg)
    manifests = {}
    for stage, function in (
        ("dump", run_dump),
        ("cluster", run_cluster),
        ("distill", run_distill),
        ("validate", run_validate),
    ):
        manifests[stage] = function(cfg=cfg, run=run)
    export = run_export(cfg=cfg, run=run, out=run.path("export"))
    return cfg, run, manifests, export


def _reader(run):
    from storage.states import StatesReader

    return StatesReader(run.url_of(run.output_path("dump")))


def test_dump_on_cuda_in_bfloat16(gpu_run, tmp_path, tiny_model, tiny_corpus):
    from pipeline.stages.dump import run_dump

    _, run, manifests, _ = gpu_run
    reader = _reader(run)
    cpu = _run(tmp_path / "cpu", _config(tiny_model, tiny_corpus, device="cpu", dtype="float32"))
    run_dump(cfg=_config(tiny_model, tiny_corpus, device="cpu", dtype="float32"), run=cpu)
    reference = _reader(cpu)
    assert manifests["dump"].outputs["rows"] == reader.num_rows == reference.num_rows > 0
    np.testing.assert_array_equal(reader.read("token_id"), reference.read("token_id"))
    for layer in reader.layers:
        x = reader.read_x(layer).float()
        assert torch.isfinite(x).all()
        relative = (x - reference.read_x(layer).float()).norm() / reference.read_x(layer).float().norm()
        assert relative < 0.05  # bfloat16 against float32: 3 significant digits
        idx = reader.read("topk_idx", layer=layer)
        assert idx.min() >= 0 and idx.max() < reader.attrs["num_experts"]
        same = (idx[:, :1] == reference.read("topk_idx", layer=layer)[:, :1]).mean()
        assert same > 0.7  # near ties of a random gate may flip in bfloat16


def test_cluster_with_faiss_on_the_gpu(gpu_run):
    import faiss

    from storage.layer_files import read_layer_meta

    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU (install the gpu extra: faiss-gpu-cu12)")
    _, run, _, _ = gpu_run
    for layer in _reader(run).layers:
        meta = read_layer_meta(run, run.output_path("cluster"), layer)
        assert meta["kmeans"]["gpu"] is True
        assert meta["kmeans"]["size_max"] - meta["kmeans"]["size_min"] <= 1


def test_model_level_distillation_and_calibration_on_cuda_in_bfloat16(gpu_run):
    from pipeline.router.load import distilled_routers

    _, run, manifests, _ = gpu_run
    model_level = manifests["distill"].stats["model_level"]
    assert model_level["steps"] == 4 and math.isfinite(model_level["best"]["kl"])
    routers, metrics = distilled_routers(run)
    for layer, figures in metrics.items():
        low, high = figures["model_calibration_slots"]
        assert high - low <= max(2, 0.05 * high), layer  # the bias calibrated in the model balances its slots
    for router in routers.values():
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in router.parameters())


def test_validate_on_cuda(gpu_run):
    _, run, manifests, _ = gpu_run
    rows = {row["variant"]: row for row in manifests["validate"].stats["summary"]}
    assert set(rows) == {"original", "original+bias", "lpr-init", "lpr"}
    assert all(math.isfinite(row["cross_entropy"]) for row in rows.values())
    assert rows["lpr"]["gini"] < rows["original"]["gini"] + 0.05
    assert run.fs.exists(run.path("report", "report.json"))


def test_device_map_auto_dumps_the_same_states(gpu_run, tmp_path, tiny_model, tiny_corpus):
    from pipeline.stages.dump import run_dump

    _, run, _, _ = gpu_run
    cfg = _config(tiny_model, tiny_corpus, device_map="auto", dtype="bfloat16")
    mapped = _run(tmp_path / "mapped", cfg)
    run_dump(cfg=cfg, run=mapped)
    first, second = _reader(run), _reader(mapped)
    assert first.num_rows == second.num_rows
    for layer in first.layers:
        agree = (first.read("topk_idx", layer=layer) == second.read("topk_idx", layer=layer)).mean()
        assert agree > 0.99


def test_export_loads_on_cuda_and_routes_like_the_validated_routers(gpu_run, tiny_model):
    from pipeline.moe.loading import find_routers
    from pipeline.router.load import distilled_routers, load_lpr_model
    from pipeline.router.lpr import LatentPrototypeRouter

    _, run, _, export = gpu_run
    model = load_lpr_model(str(tiny_model), export, dtype=torch.bfloat16, device_map="cuda")
    sites = find_routers(model)
    assert sites and all(isinstance(site.module, LatentPrototypeRouter) for site in sites)
    stored, _ = distilled_routers(run)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert logits.device.type == "cuda" and torch.isfinite(logits.float()).all()
    for site in sites:
        x = torch.randn(64, site.module.hidden_dim, device="cuda")
        expected = stored[site.name].to("cuda")(x)[2]
        assert torch.equal(site.module(x)[2], expected), site.name
