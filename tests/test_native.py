"""``router.form: native``: a distillation that trains only the family's own router tensors, so its routers
fold into a drop-in checkpoint — checked end to end on tiny models of three kinds of family (a choice
bias: DeepSeek-V3; nothing but the weight: Qwen3-MoE; a logit bias: GPT-OSS), loaded by stock
``from_pretrained`` in a fresh process; the weight-only balance fold; validate's ``native`` and
``checkpoint`` variants; the config's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import build_config
from pipeline.errors import LprError
from pipeline.evaluation.variants import VARIANTS
from pipeline.moe.families import FAMILIES
from pipeline.moe.loading import find_routers
from pipeline.router.calibrate import router_logits
from pipeline.router.install import gate_routers, install_routers
from pipeline.router.load import distilled_routers
from pipeline.router.lpr import LatentPrototypeRouter, spec_for
from pipeline.router.native import fold_router, fold_routers
from pipeline.router.native_balance import calibrate_native_in_model, slots
from pipeline.router.shipped import checkpoint_routers, shipped_routers
from pipeline.stages.export_checkpoint import export_checkpoint
from pipeline.stages.validate import run_validate
from pipeline.testing.tiny_checkpoints import check_in_fresh_process, stock_case
from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts
from pipeline.testing.tiny_families import perturb_gates, tiny_model
from pipeline.testing.tiny_native import NATIVE, native_run
from storage.report import read_report
from storage.rundir import RunDir
from tests.test_cli import assert_one_line_error, invoke

KINDS = ["deepseek_v3", "qwen3_moe", "gpt_oss"]  # choice bias; weight only; logit bias


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(make_texts(40))


@pytest.fixture(scope="module")
def native(tmp_path_factory, tokenizer, tiny_corpus):
    """Per family: (cfg, run, model, routers, checkpoint directory, stock check) — all checkpoints loaded in
    one fresh interpreter that cannot import this project."""
    root = tmp_path_factory.mktemp("native")
    built, items, contexts = {}, [], {}
    for family in KINDS:
        cfg, run, model = native_run(root / family, family, tokenizer, tiny_corpus)
        routers, _ = distilled_routers(run)
        written = export_checkpoint(routers, root / family / "source", root / family / "checkpoint")
        item, contexts[family] = stock_case(family, model, routers, root / family, written)
        items.append(item)
        built[family] = (cfg, run, model, routers, root / family / "checkpoint")
    checked = check_in_fresh_process(items, contexts, root)
    return {family: (*built[family], checked[family]) for family in KINDS}


@pytest.mark.parametrize("family", KINDS)
def test_stock_from_pretrained_routes_as_the_native_routers(native, family):
    *_, result = native[family]
    assert "error" not in result, result
    assert result["project_modules_imported"] == [] and result["stock_modules"] == ["transformers"]
    assert not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"]), result
    assert result["logits_max_abs_diff"] <= 1e-5 and result["indices_equal"], result
    assert result["original_logits_min_diff"] > 1e-3 and result["original_indices_changed_share"] > 0, result
    assert result["differing_outside_routers"] == [] and result["differing_tensors"] == result["router_tensors"]


@pytest.mark.parametrize("family", KINDS)
def test_only_the_family_tensors_moved(native, family):
    cfg, run, model, routers, *_ = native[family]
    entry = FAMILIES[family]
    gates = gate_routers(model)
    assert cfg.router.init == "gate"
    for name, router in routers.items():
        assert torch.equal(router.prototypes, torch.eye(router.num_experts))
        assert bool(router.encoder.bias.abs().max() > 0) == bool(entry.logit_bias)  # calibrated into it
        assert bool(router.bias.abs().max() > 0) == bool(entry.choice_bias)
        assert not torch.equal(router.encoder.weight, gates[name].encoder.weight)  # trained (and folded)
    summaries = run.read_manifest("distill").stats["model_level"]
    assert summaries["steps"] == NATIVE["distill"]["model_steps"]
    layers = [meta for meta in distilled_routers(run)[1].values()]
    assert all(meta["form"] == "native" for meta in layers)
    assert all(("constant_direction_std" in meta) == (family == "qwen3_moe") for meta in layers)


def _imbalanced(model, family: str) -> None:
    """Push every gate towards its first experts along the mean router input: a collapsed routing."""
    with torch.no_grad():
        for site in find_routers(model):
            weight = FAMILIES[family].gate_tensors(site.module, None)[0]
            weight[:2] += 3.0 * weight.abs().mean() * torch.sign(weight[:2])


def test_the_weight_only_fold_balances_the_calibration_sequences(tokenizer):
    """Qwen3-MoE has no bias tensor: the balancing logit offsets go into the gate weight along the
    input's most nearly constant direction; the routing it gives is balanced on the calibration
    sequences (as the stats say), folds with encoder and choice bias at 0, and the logits moved
    by offset × (v·x), whose spread is reported."""
    family = "qwen3_moe"
    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    perturb_gates(model, family)
    _imbalanced(model, family)
    routers = gate_routers(model)
    install_routers(model, routers)
    ids = torch.randint(3, len(tokenizer), (16, 32), generator=torch.Generator().manual_seed(0))
    before = {name: slots(r, router_logits(model, r, ids, 8)) for name, r in routers.items()}
    stats = calibrate_native_in_model(model, ids, family=FAMILIES[family], batch=8)
    for name, router in routers.items():
        after = slots(router, router_logits(model, router, ids, 8))  # the folded weight, in the model
        spread_before, spread_after = before[name].max() - before[name].min(), after.max() - after.min()
        assert spread_after < 0.2 * spread_before and spread_after <= 0.05 * after.mean(), (before[name], after)
        assert [stats[name]["slots_min"], stats[name]["slots_max"]] == [after.min(), after.max()]
        low, high = stats[name]["unbalanced_slots"]  # what it got from the re-routed layers above, before its fold
        assert high - low > 5 * spread_after
        assert stats[name]["constant_direction_std"] > 0 and 0 <= stats[name]["nonpositive_share"] < 0.5
        folded = fold_router(router, FAMILIES[family])
        assert folded.logit_bias is None and folded.choice_bias is None


def test_native_and_checkpoint_variants_measure_what_ships(native, tmp_path):
    cfg, run, model, routers, out, _ = native["deepseek_v3"]
    built = VARIANTS["native"].build(cfg, run, model)
    x = torch.randn(50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, router in routers.items():
        with torch.no_grad():
            expected_logits, _, expected_indices = router(x)
            logits, _, indices = built.routers[name](x)
        assert (logits - expected_logits).abs().max() <= 1e-5 and torch.equal(indices, expected_indices)
    validate = {"variants": ["original", "native"], "sequences": 8, "batch_size": 4, "tasks": []}
    checked = build_config(cfg.model_dump(mode="json") | {"validate": validate | {"checkpoint": str(out)}})
    run_validate(cfg=checked, run=run)
    report = read_report(run)
    assert list(report["variants"]) == ["original", "native", "checkpoint"]
    shipped, measured = report["variants"]["native"], report["variants"]["checkpoint"]
    assert measured["cross_entropy"] == pytest.approx(shipped["cross_entropy"], abs=1e-6)
    assert measured["mean"]["slot"]["gini"] == pytest.approx(shipped["mean"]["slot"]["gini"], abs=1e-9)
    assert shipped["cross_entropy"] != report["variants"]["original"]["cross_entropy"]


def test_a_checkpoint_of_another_model_is_one_line(native):
    cfg, _, model, *_ = native["deepseek_v3"]
    other = native["qwen3_moe"][4]
    source = Path(cfg.model.path)
    with pytest.raises(LprError, match="is not one of the run's model") as err:
        checkpoint_routers(other, model, source)
    assert "\n" not in str(err.value)


def test_routers_that_do_not_fold_are_one_line_in_the_native_variant(native):
    cfg, _, model, routers, *_ = native["qwen3_moe"]
    spec = spec_for(model.config, latent_dim=4, similarity="cosine")
    cosine = {name: LatentPrototypeRouter(spec) for name in routers}
    with pytest.raises(LprError, match=r"router\.form: native"):
        shipped_routers(cosine, model, Path(cfg.model.path))
    assert fold_routers(routers, FAMILIES["qwen3_moe"])  # the native ones do


def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert build_config({"router": {"form": "native"}}).router.init == "gate"
    with pytest.raises(LprError, match=r"router\.form=native .* router\.init=clusters: choose one") as err:
        build_config({"router": {"form": "native", "init": "clusters"}})
    assert "\n" not in str(err.value)
    code, _, stderr = invoke(
        monkeypatch, capsys, "config", "show", "--set", "router.form=native", "--set", "router.init=clusters"
    )
    assert_one_line_error(code, stderr, "router.form=native", "choose one")


def test_cli_exports_a_native_run_and_validates_its_checkpoint(native, tmp_path, monkeypatch, capsys):
    """`export RUN --checkpoint OUT` on a native run, then `validate RUN --checkpoint OUT`: the files' figures
    beside the native variant's; a missing directory is one line."""
    _, run, *_ = native["qwen3_moe"]
    out = tmp_path / "shipped"
    code, stdout, err = invoke(monkeypatch, capsys, "export", run.url, "--checkpoint", str(out))
    assert code == 0 and "checkpoint (weight)" in stdout, err
    measure = ("--variants", "original,native", "--tasks", "", "--sequences", "8")
    code, _, err = invoke(monkeypatch, capsys, "validate", run.url, *measure, "--checkpoint", str(out))
    assert code == 0, err
    report = read_report(run)
    assert list(report["variants"]) == ["original", "native", "checkpoint"]
    assert report["variants"]["checkpoint"]["build"]["directory"] == str(out.resolve())
    figures = [report["variants"][name]["mean"]["slot"]["gini"] for name in ("native", "checkpoint")]
    assert figures[0] == pytest.approx(figures[1], abs=1e-9)
    code, _, err = invoke(monkeypatch, capsys, "validate", run.url, *measure, "--checkpoint", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "is not a directory")


def test_recalibrating_a_native_run_keeps_it_drop_in(native, tmp_path):
    """recalibrate on a native Qwen3-MoE run (no choice-bias tensor): the new version's balance is folded into
    the gate weights, so it still folds, and the shipped checkpoint gets a new sibling (the old one untouched)."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.config import CorpusConfig
    from pipeline.stages.export_checkpoint import run_export_checkpoint
    from pipeline.stages.recalibrate import run_recalibrate
    from tests.test_recalibrate import RECALIBRATE, skewed_traffic

    cfg, run, *_ = native["qwen3_moe"]
    copy = RunDir(str(tmp_path / "run"))
    shutil.copytree(run.root, copy.root)
    cfg = build_config(cfg.model_dump(mode="json") | {"recalibrate": RECALIBRATE | {"publish": "always"}})
    shipped = tmp_path / "shipped"
    run_export_checkpoint(cfg=cfg, run=copy, out=shipped)
    before = {p.name: p.read_bytes() for p in shipped.glob("*.safetensors")}
    traffic = CorpusConfig.model_validate(
        cfg.corpus.model_dump() | {"source": str(skewed_traffic(tmp_path / "traffic")), "format": "auto"}
    )
    manifest = run_recalibrate(cfg=cfg, run=copy, traffic=traffic)
    assert manifest.outputs["published"] and manifest.outputs["checkpoint"] == str(tmp_path / "shipped-v001")
    routers, _ = distilled_routers(copy)
    folded = fold_routers(routers, FAMILIES["qwen3_moe"])  # still the family's own form: no choice bias
    assert all(float(r.bias.abs().max()) == 0 for r in routers.values())
    assert {p.name: p.read_bytes() for p in shipped.glob("*.safetensors")} == before
    new = {k: v for p in sorted((tmp_path / "shipped-v001").glob("*.safetensors")) for k, v in load_file(p).items()}
    old = {k: v for p in sorted(shipped.glob("*.safetensors")) for k, v in load_file(p).items()}
    changed = [k for k in new if not torch.equal(new[k], old[k])]
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    name = next(iter(folded))
    assert torch.allclose(new[f"{name}.weight"].double(), folded[name].weight.to(new[f"{name}.weight"].dtype).double())
