"""Drop-in checkpoints (``export --checkpoint``): routers folded into the family's own tensors, loaded
by stock ``from_pretrained`` in a fresh process that cannot import this project, route exactly as the
in-memory routers do, for every family; untouched tensors keep their bytes; bad targets, routers
of another model and forms the family cannot carry are one-line errors that leave nothing at OUT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.errors import LprError
from pipeline.moe.families import FAMILIES
from pipeline.moe.loading import find_routers
from pipeline.router.load import distilled_routers
from pipeline.router.lpr import LatentPrototypeRouter, spec_for
from pipeline.router.native import FamilyRouter, drop_in_form, fold_router
from pipeline.stages.distill import run_distill
from pipeline.stages.export_checkpoint import export_checkpoint
from pipeline.testing.tiny_checkpoints import SHARD, check_checkpoints, differing_tensors, foldable_routers, passes
from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts
from pipeline.testing.tiny_families import perturb_gates, save_tiny_llama4_checkpoint, tiny_model
from storage.routers_store import read_layer_router, write_layer_router
from tests.conftest import clustered_run
from tests.test_cli import assert_one_line_error, invoke

ALL = sorted(FAMILIES)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(make_texts(40))


@pytest.fixture(scope="module")
def checked(tmp_path_factory, tokenizer):
    """Every family exported and loaded by stock transformers, all in one fresh interpreter."""
    return check_checkpoints(ALL, tmp_path_factory.mktemp("checkpoints"), tokenizer)


@pytest.mark.parametrize("family", ALL)
def test_stock_from_pretrained_routes_as_the_routers(checked, family):
    result = checked[family]
    assert "error" not in result, result
    assert result["project_modules_imported"] == [] and result["stock_modules"] == ["transformers"]
    assert not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"]), result
    assert result["logits_max_abs_diff"] <= 1e-5 and result["indices_equal"], result
    assert result["weights_max_abs_diff"] <= 1e-5, result
    # and not the original gates': logits far off, the experts of most tokens moved
    assert result["original_logits_min_diff"] > 1e-3 and result["original_indices_changed_share"] > 0.3, result
    # only router tensors changed bytes (the weight of every router, its bias where the family has one)
    assert result["differing_outside_routers"] == [] and result["differing_tensors"] == result["router_tensors"]
    assert result["linked"] >= 1 and result["rewritten"] >= 1  # shards without a router are links
    assert result["form"] == drop_in_form(FAMILIES[family]) and passes(result)


def test_the_forms_per_family():
    forms = {family: drop_in_form(FAMILIES[family]) for family in ALL}
    assert forms["gpt_oss"] == "weight + logit bias"
    assert forms["deepseek_v3"] == forms["ernie4_5_moe"] == forms["lfm2_moe"] == "weight + choice bias"
    assert forms["qwen3_moe"] == forms["mixtral"] == forms["phimoe"] == forms["llama4_text"] == "weight"


def _source(root: Path, tokenizer, family: str = "qwen3_moe", seed: int = 0):
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    perturb_gates(model, family, seed=seed)
    model.generation_config.max_new_tokens = 7  # so that a generation_config.json is written
    model.save_pretrained(root / "source", max_shard_size=SHARD)
    tokenizer.save_pretrained(root / "source")
    return model, root / "source"


def test_files_links_and_the_source_untouched(tmp_path, tokenizer):
    model, source = _source(tmp_path, tokenizer)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    written = export_checkpoint(foldable_routers(model, "qwen3_moe"), source, tmp_path / "out")
    out = tmp_path / "out"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the source is not modified
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == before[name], name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in source.glob("*.safetensors")}
    for name in written["linked"]:
        assert os.path.samefile(out / name, source / name)  # hard links: no bytes written
    for name in written["rewritten"]:
        assert not os.path.samefile(out / name, source / name)
        assert (out / name).stat().st_size == (source / name).stat().st_size  # same header, same offsets
    assert written["cast_max_abs_error"] < 1e-6  # float64 fold → the stored float32
    record = json.loads((out / "lpr_checkpoint.json").read_text())
    assert record["form"] == "weight" and record["router_tensors"] == written["router_tensors"]
    assert not (tmp_path / "out.partial").exists()


def test_a_bfloat16_source_keeps_its_dtype(tmp_path, tokenizer):
    model, _ = _source(tmp_path, tokenizer, "deepseek_v3")
    routers = foldable_routers(model, "deepseek_v3")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    written = export_checkpoint(routers, tmp_path / "bf16", tmp_path / "out")
    key = next(k for k in written["router_tensors"] if k.endswith("gate.weight"))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor(key).dtype == torch.bfloat16
    assert 0 < written["cast_max_abs_error"] < 0.05  # the rounding to bfloat16, recorded


def test_a_full_llama4_checkpoint_keeps_its_vision_tower(tmp_path, tokenizer):
    """Released Llama 4 checkpoints are composite (model_type llama4, a vision tower, keys under
    language_model.): AutoModelForCausalLM loads the text model; the export finds the router keys there."""
    source = save_tiny_llama4_checkpoint(tmp_path / "source", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    routers = foldable_routers(model, "llama4_text")
    written = export_checkpoint(routers, source, tmp_path / "out")
    assert all(key.startswith("language_model.") for key in written["router_tensors"])
    assert differing_tensors(source, tmp_path / "out") == set(written["router_tensors"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = 0.2 * torch.randn(32, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    for name, router in routers.items():
        with torch.no_grad():
            assert (loaded.get_submodule(name)(x)[1] - router(x)[1]).abs().max() <= 1e-5  # (scores, logits)


def test_routers_already_in_the_family_form_are_written_as_they_are(tmp_path, tokenizer):
    """What a native distillation will hand over: the family's own tensors, no fold."""
    model, source = _source(tmp_path, tokenizer, "deepseek_v3")
    gen = torch.Generator().manual_seed(3)
    native = {
        site.name: FamilyRouter(torch.randn(8, 64, generator=gen), None, torch.rand(8, generator=gen))
        for site in find_routers(model)
    }
    export_checkpoint(native, source, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, router in native.items():
        gate = loaded.get_submodule(name)
        assert torch.equal(gate.weight, router.weight.float())
        assert torch.equal(gate.e_score_correction_bias, router.choice_bias.float())
    wrong = {name: FamilyRouter(router.weight[:, :32], None, router.choice_bias) for name, router in native.items()}
    with pytest.raises(LprError, match=r"weight \(8, 32\) ≠ the model's \(8, 64\)"):
        export_checkpoint(wrong, source, tmp_path / "again")


def test_narrow_and_variational_dot_routers_fold_exactly():
    config = tiny_model("qwen3_moe").config
    x = torch.randn(50, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for latent, variational in ((3, False), (16, True)):
        spec = spec_for(config, latent_dim=latent, similarity="dot")
        router = LatentPrototypeRouter(type(spec)(**spec.to_dict() | {"variational": variational})).eval()
        with torch.no_grad():
            router.encoder.bias.zero_()  # Qwen3-MoE's gate has no bias to take P·b
        folded = fold_router(router, FAMILIES["qwen3_moe"])
        assert folded.weight.shape == (router.num_experts, config.hidden_size)
        assert torch.linalg.matrix_rank(folded.weight) <= latent  # a narrow encoder: a low-rank gate, exact
        with torch.no_grad():
            expected = router.scores(x)
        assert (F.linear(x, folded.weight.float()) - expected).abs().max() <= 1e-5


def _router(family: str, **change) -> LatentPrototypeRouter:
    config = tiny_model(family).config
    router = LatentPrototypeRouter(spec_for(config, latent_dim=8, similarity=change.pop("similarity", "dot")))
    with torch.no_grad():
        router.encoder.bias.zero_()
        for name, value in change.items():
            (router.bias if name == "bias" else router.get_parameter(name)).fill_(value)
    return router


@pytest.mark.parametrize(
    ("family", "change", "needle"),
    [
        ("qwen3_moe", {"similarity": "cosine"}, "cosine-similarity LPR is not linear"),
        ("deepseek_v3", {"similarity": "gaussian"}, "gaussian-similarity"),
        ("mixtral", {"similarity": "mahalanobis"}, "mahalanobis-similarity"),
        ("qwen3_moe", {"bias": 0.1}, "choice bias (max |b| 0.1) has no tensor in a Qwen3-MoE checkpoint"),
        ("gpt_oss", {"bias": 0.1}, "has no tensor in a GPT-OSS checkpoint"),
        ("deepseek_v3", {"encoder.bias": 0.1}, "a DeepSeek-V3 gate has no bias"),
    ],
)
def test_what_does_not_fold_is_one_line_naming_the_native_form(tmp_path, tokenizer, family, change, needle):
    model, source = _source(tmp_path, tokenizer, family)
    routers = foldable_routers(model, family)
    name = next(iter(routers))
    routers[name] = _router(family, **change)
    with pytest.raises(LprError, match=r"router\.form: native") as err:
        export_checkpoint(routers, source, tmp_path / "out")
    assert needle in str(err.value) and name in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_routers_of_another_model_are_refused(tmp_path, tokenizer):
    model, source = _source(tmp_path, tokenizer, "mixtral")
    other = foldable_routers(tiny_model("qwen2_moe", num_hidden_layers=2, num_experts=4), "qwen2_moe")
    with pytest.raises(LprError, match=r"made for another model .* experts 4 ≠ the model's 8"):
        export_checkpoint(other, source, tmp_path / "out")
    fewer = dict(list(foldable_routers(model, "mixtral").items())[:1])
    with pytest.raises(LprError, match="routers for 1 MoE layers ≠ the model's 2"):
        export_checkpoint(fewer, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_a_failed_write_leave_nothing_at_out(tmp_path, tokenizer, monkeypatch):
    model, source = _source(tmp_path, tokenizer)
    routers = foldable_routers(model, "qwen3_moe")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(LprError, match="exists and is not empty"):
        export_checkpoint(routers, source, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(LprError, match="cannot be written"):
        export_checkpoint(routers, source, tmp_path / "file" / "out")
    with pytest.raises(LprError, match="not a local directory"):
        export_checkpoint(routers, source, "s3://bucket/out")

    import storage.checkpoint

    def broken(*_args):
        raise OSError(28, "No space left on device", "model.safetensors.index.json")

    monkeypatch.setattr(storage.checkpoint, "_write_index", broken)
    with pytest.raises(LprError, match="no room to write"):
        export_checkpoint(routers, source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "empty").mkdir()  # an empty directory is a fine target
    monkeypatch.undo()
    assert export_checkpoint(routers, source, tmp_path / "empty")["form"] == "weight"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_target_is_refused(tmp_path, tokenizer):
    model, source = _source(tmp_path, tokenizer)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(LprError, match="cannot be written"):
        export_checkpoint(foldable_routers(model, "qwen3_moe"), source, locked / "out")


@pytest.mark.slow
def test_cli_exports_the_served_routers(tmp_path, tiny_model, tiny_corpus, monkeypatch, capsys):
    """A real run distilled from the gates: its routers carry a calibrated choice bias and a trained encoder
    bias that a Qwen3-MoE checkpoint cannot hold (one line); with both at 0 they fold, and the CLI writes
    the checkpoint, its manifest, and says where."""
    model_level = {"model_steps": 2, "model_batch_sequences": 2, "model_val_sequences": 2, "model_eval_every": 1}
    router = {"init": "gate", "calibration_rows": 512}
    distill = model_level | {"calibration_sequences": 4}
    cfg, run = clustered_run(tmp_path / "run", tiny_model, tiny_corpus, router=router, distill=distill)
    run_distill(cfg=cfg, run=run)
    out = tmp_path / "checkpoint"
    code, _, err = invoke(monkeypatch, capsys, "export", str(tmp_path / "run"), "--checkpoint", str(out))
    assert_one_line_error(code, err, "router.form: native", "choice bias")
    assert not out.exists()
    code, _, err = invoke(monkeypatch, capsys, "export", str(tmp_path / "run"), "--checkpoint", "x", "--init-only")
    assert_one_line_error(code, err, "--checkpoint", "Drop --init-only")

    directory = run.output_path("distill")
    for layer in run.read_manifest("distill").outputs["layers"]:
        state, meta = read_layer_router(run, directory, layer)
        state["bias"].zero_()
        state["encoder.bias"].zero_()
        write_layer_router(run, directory, layer, state, meta)
    code, stdout, err = invoke(monkeypatch, capsys, "export", str(tmp_path / "run"), "--checkpoint", str(out))
    assert code == 0, err
    assert str(out.resolve()) in stdout and "from_pretrained" in stdout
    manifest = run.read_manifest("export_checkpoint")
    assert manifest.outputs["directory"] == str(out.resolve()) and manifest.outputs["form"] == "weight"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    routers, _ = distilled_routers(run)
    x = torch.randn(64, loaded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, router in routers.items():
        with torch.no_grad():
            logits, _, indices = loaded.get_submodule(name)(x)
            expected, _, expected_indices = router(x)
        assert (logits - expected).abs().max() <= 1e-5 and torch.equal(indices, expected_indices)
