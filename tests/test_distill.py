"""Gate-level distillation on a tiny real run, and the Sinkhorn projection it imitates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline import load_lpr_model
from pipeline.cli.status import run_status
from pipeline.config import build_config
from pipeline.errors import LprError
from pipeline.evaluation.variants import VARIANTS
from pipeline.moe.loading import find_routers, load_model
from pipeline.router.install import gate_routers
from pipeline.router.load import distilled_routers
from pipeline.stages.distill import run_distill
from pipeline.stages.export import run_export
from pipeline.training.gate_level import split_chunks
from pipeline.training.objectives import sinkhorn_balance, teacher_target
from storage.routers_store import read_layer_router
from storage.rundir import RunDir
from tests.conftest import clustered_run, tiny_run_config


def test_sinkhorn_gives_uniform_columns_and_stays_close():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(400, 8) * 2 + torch.linspace(0, 3, 8), dim=-1)
    balanced = sinkhorn_balance(probs, 200)
    torch.testing.assert_close(balanced.sum(1), torch.ones(400))
    torch.testing.assert_close(balanced.sum(0), torch.full((8,), 50.0), rtol=1e-3, atol=1e-3)
    assert probs.sum(0).std() > 10 * balanced.sum(0).std()
    assert (balanced.argmax(1) == probs.argmax(1)).float().mean() > 0.4  # a projection, not noise
    torch.testing.assert_close(teacher_target(torch.log(probs), 0.0), probs)


def test_split_chunks_keeps_validation_apart():
    train, val = split_chunks(10_000, 256, 0.1, seed=0)
    assert len(val) == 4 and not set(train) & set(val)
    assert sum(b - a for a, b in train + val) == 10_000
    assert split_chunks(300, 512, 0.1, seed=0) == ([(0, 270)], [(270, 300)])  # one chunk: split by rows


MODEL_LEVEL = {
    "model_steps": 12,
    "model_batch_sequences": 2,
    "model_val_sequences": 4,
    "model_eval_every": 4,
    "calibration_sequences": 16,
}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model, tiny_corpus):
    distill = {"steps": 60, "batch_rows": 128, "buffer_rows": 1024, "eval_every": 20, "val_rows": 512} | MODEL_LEVEL
    cfg, run = clustered_run(tmp_path_factory.mktemp("distill") / "run", tiny_model, tiny_corpus, distill=distill)
    return cfg, run, run_distill(cfg=cfg, run=run)


def test_distill_improves_on_the_init_and_balances_calibration(distilled):
    cfg, run, manifest = distilled
    assert run.is_complete("distill")
    for layer, stats in manifest.stats["layers"].items():
        low, high = stats["calibration_slots"]
        assert high - low <= max(2, 0.02 * 512 * 2 / 4), layer  # exact up to near-ties
        assert 0 <= stats["val_topk_agreement"] <= 1
        _, meta = read_layer_router(run, run.output_path("distill"), layer)
        losses = [point["loss"] for point in meta["history"]]
        assert min(losses) < losses[0]  # training lowers the held-out loss below the LPR-init's
        assert meta["summary"]["best_step"] == meta["history"][losses.index(min(losses))]["step"]
    again = run_distill(cfg=cfg, run=run)
    assert again.skipped
    stages = run_status(run)["stages"]
    assert stages["cluster"]["details"].startswith("2 layers, slot counts differ by ≤ ")
    assert stages["distill"]["details"].startswith("2 layers; gate level: Gini on held-out chunks ")
    assert "; in the model: best step " in stages["distill"]["details"]


def test_distilled_routers_export_and_load(distilled, tmp_path, tiny_model):
    cfg, run, _ = distilled
    out = run_export(cfg=cfg, run=run, out=tmp_path / "lpr")
    model = load_lpr_model(str(tiny_model), out)
    assert len(find_routers(model)) == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)


def test_export_writes_its_manifest_and_status_says_so(distilled, tmp_path):
    """`lpr-distill status RUN --json` after `export` says export is complete and where it went; once
    that directory is gone it no longer does."""
    cfg, run, _ = distilled
    out = run_export(cfg=cfg, run=run, out=tmp_path / "exported")
    status = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", run.url, "--json"], capture_output=True, text=True, check=True
    )
    export = json.loads(status.stdout)["stages"]["export"]
    assert export["complete"] and export["bytes"] > 0
    assert str(out.resolve()) in export["details"]
    shutil.rmtree(out)
    assert not run_status(run)["stages"]["export"]["complete"]


@pytest.mark.slow
@pytest.mark.parametrize("model_steps", [0, 12])
def test_distill_from_the_models_own_gates(tmp_path, tiny_model, tiny_corpus, model_steps):
    """router.init: gate — no gate-level phase: the model-level phase starts from each layer's own gate
    (a compact dot-product LPR). With no model-level step the stored router is the gate itself (same
    logits) plus its calibrated bias; with steps it has moved. Either way it exports and loads."""
    model_level = MODEL_LEVEL | {"model_steps": model_steps}
    router = {"init": "gate", "calibration_rows": 512}
    cfg, run = clustered_run(tmp_path / "run", tiny_model, tiny_corpus, router=router, distill=model_level)
    manifest = run_distill(cfg=cfg, run=run)
    assert all(summary["init"] == "gate" for summary in manifest.stats["layers"].values())
    assert not run.fs.exists(run.path("routers", "gate"))  # nothing was distilled at gate level
    model, _ = load_model(cfg.model, cfg.model.path)
    gates = gate_routers(model)
    routers, metrics = distilled_routers(run)
    assert set(routers) == set(gates) and len(routers) == 2
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, router in routers.items():
        assert router.spec.similarity == "dot" and router.spec.latent_dim == router.num_experts
        with torch.no_grad():
            same = torch.equal(router.scores(x), gates[name].scores(x))
        assert same == (model_steps == 0), name
        assert router.bias.abs().sum() > 0  # calibrated in the model
    for summary in metrics.values():
        low, high = summary["model_calibration_slots"]
        assert high - low <= max(2, 0.05 * high)
    assert run_status(run)["stages"]["distill"]["details"].startswith("2 layers from the model's own gates")
    assert VARIANTS["lpr"].build(cfg, run, model).info["init"] == "gate"  # the report says where it started
    out = run_export(cfg=cfg, run=run, out=tmp_path / "lpr")
    assert "starting from the model's own gates" in (out / "README.md").read_text()
    loaded = load_lpr_model(str(tiny_model), out)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids, labels=ids, use_cache=False).loss)


def test_distill_needs_prototypes(tmp_path, tiny_model, tiny_corpus):
    cfg = build_config(tiny_run_config(tiny_model, tiny_corpus))
    with pytest.raises(LprError, match="no complete prototypes"):
        run_distill(cfg=cfg, run=RunDir(str(tmp_path / "empty")))


def test_sequence_balance_loss_is_zero_only_for_balanced_sequences():
    from pipeline.training.model_level import sequence_balance_loss

    balanced = torch.log(torch.eye(4).repeat(2, 1) * 0.9 + 0.025)  # 2 sequences of 4 tokens, one per expert
    assert float(sequence_balance_loss(balanced, 2, 50)) < 1e-4
    skewed = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1))
    assert float(sequence_balance_loss(skewed, 2, 50)) > 0.1
    # sequence 1 all on expert 0, sequence 2 all on expert 1: balanced over the batch, not within each
    halves = torch.log(torch.tensor([[0.98, 0.02]] * 4 + [[0.02, 0.98]] * 4))
    assert float(sequence_balance_loss(halves, 1, 50)) < 1e-3
    assert float(sequence_balance_loss(halves, 2, 50)) > 0.5


def test_model_level_trains_routers_only_and_calibrates_in_the_model(distilled, tiny_model):
    from pipeline.config import DistillConfig
    from pipeline.moe.loading import load_model
    from pipeline.router.calibrate import router_logits
    from pipeline.router.install import install_routers
    from pipeline.training.model_level import distill_in_model

    cfg, run, manifest = distilled
    model_level = manifest.stats["model_level"]
    objectives = [point["objective"] for point in model_level["history"]]
    assert model_level["best"]["objective"] == min(objectives) and len(objectives) == 4  # step 0 + every 4 of 12
    gate, final = run.output_path("distill") + "/gate", run.output_path("distill")
    for layer in manifest.outputs["layers"]:
        gate_state, _ = read_layer_router(run, gate, layer)
        final_state, meta = read_layer_router(run, final, layer)
        if model_level["best"]["step"] > 0:
            assert not torch.equal(gate_state["prototypes"], final_state["prototypes"])
        low, high = meta["summary"]["model_calibration_slots"]
        assert high - low <= 4, layer  # 16 sequences · 32 tokens · top-2 slots, equal up to near-ties

    # the calibration holds in the model: routing the calibration sequences again gives equal slots
    model, _ = load_model(cfg.model, str(tiny_model))
    routers = distilled_routers(run)[0]
    before = {name: p.clone() for name, p in model.named_parameters()}
    d = DistillConfig(**(cfg.distill.model_dump() | {"model_steps": 3}))
    ids = torch.randint(0, model.config.vocab_size, (10, 16), generator=torch.Generator().manual_seed(0))
    distill_in_model(model, routers, ids[:6], ids[6:], d, seed=0)
    for name, parameter in model.named_parameters():  # the experts and everything else: untouched
        assert torch.equal(parameter, before[name]), name
    assert not any(isinstance(site.module, type(next(iter(routers.values())))) for site in find_routers(model))
    install_routers(model, routers)
    for site in find_routers(model):
        logits = router_logits(model, site.module, ids, batch=4)
        assert logits.shape == (10 * 16, site.module.spec.num_experts)


def test_model_level_trains_under_the_calibrated_bias(distilled, tiny_model):
    """With calibration sequences the routers route with a calibrated bias from the first step: the
    step-0 evaluation on those same sequences is balanced, while without them the routers route unbiased."""
    from pipeline.config import DistillConfig
    from pipeline.moe.loading import load_model
    from pipeline.training.model_level import distill_in_model

    cfg, run, _ = distilled
    model, _ = load_model(cfg.model, str(tiny_model))
    ids = torch.randint(0, model.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(1))
    d = DistillConfig(**(cfg.distill.model_dump() | {"model_steps": 2, "model_calibrate_every": 1}))
    unbiased = distill_in_model(model, distilled_routers(run)[0], ids[:4], ids, d, seed=0)
    calibrated = distill_in_model(model, distilled_routers(run)[0], ids[:4], ids, d, seed=0, calibration=ids)
    assert calibrated["history"][0]["gini"] < 0.02 < unbiased["history"][0]["gini"]


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 600])
def test_warmup_cosine_schedule_works_for_any_number_of_steps(steps):
    from pipeline.training.objectives import warmup_cosine

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=2.0)
    schedule = warmup_cosine(optimizer, steps, warmup_share=0.05)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(2.0) and all(rate > 0 for rate in rates)
    assert rates[-1] <= rates[len(rates) // 2]  # decays after the warm-up


def test_distill_refuses_states_of_another_model(distilled, tmp_path, tiny_model):
    import json
    import shutil

    cfg, run, _ = distilled
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["rope_theta"] = float(config.get("rope_theta", 10000.0)) + 1
    (other / "config.json").write_text(json.dumps(config))
    wrong = build_config(cfg.model_dump(mode="json") | {"model": cfg.model.model_dump() | {"path": str(other)}})
    with pytest.raises(LprError, match="was dumped from model"):
        run_distill(cfg=wrong, run=run, force=True)
    assert run.is_complete("distill")  # refused before anything was touched


def test_next_token_gap_is_the_cross_entropy_difference_on_the_next_tokens():
    from pipeline.training.model_level import next_token_gap, next_token_log_probs

    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 5), generator=gen)
    log_teacher, log_student = next_token_log_probs(teacher), next_token_log_probs(student)

    def ce(logits: torch.Tensor) -> float:  # by hand: −log p(next token), averaged over the 2 × 4 predictions
        logp = torch.log_softmax(logits, -1)
        return float(-sum(logp[b, s, ids[b, s + 1]] for b in range(2) for s in range(4)) / 8)

    assert float(next_token_gap(log_teacher, log_student, ids)) == pytest.approx(ce(student) - ce(teacher), abs=1e-5)
    assert float(next_token_gap(log_teacher, log_teacher, ids)) == 0.0


def test_model_data_ce_changes_the_fidelity_term(distilled, tiny_model):
    """distill.model_data_ce = 0 is the KL alone; 1 is the next-token loss gap, another number on the same routers."""
    from pipeline.config import DistillConfig
    from pipeline.moe.loading import load_model
    from pipeline.training.model_level import distill_in_model

    cfg, run, _ = distilled
    model, _ = load_model(cfg.model, str(tiny_model))
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(2))
    start = {}
    for weight in (0.0, 1.0):
        d = DistillConfig(**(cfg.distill.model_dump() | {"model_steps": 1, "model_data_ce": weight}))
        start[weight] = distill_in_model(model, distilled_routers(run)[0], ids[:4], ids[4:], d, seed=0)["history"][0]
    assert start[0.0]["kl"] >= 0 and start[0.0]["gini"] == start[1.0]["gini"]  # same routers, same routing
    assert start[1.0]["kl"] != pytest.approx(start[0.0]["kl"], rel=1e-3)
