"""Every family in the adapter table, on a tiny random model built with ``from_config`` (hidden 64,
8 experts, top-2): the identity-configured LPR reproduces the model's logits, and the whole
pipeline (dump → cluster → distill → export → load_lpr_model) runs end to end. The README's
compatibility matrix is generated from the same checks (``scripts/compat_matrix.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pipeline.errors import LprError
from pipeline.moe.capture import as_triple
from pipeline.moe.families import FAMILIES, UNSUPPORTED, family_of
from pipeline.moe.loading import find_routers
from pipeline.router.install import identity_routers, install_routers
from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts
from pipeline.testing.tiny_families import check_end_to_end, check_identity, router_input, tiny_model

ALL = sorted(FAMILIES)
REQUIRED = {  # the families the product must support (issue 8)
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
    "gpt_oss", "llama4_text", "granitemoe", "phimoe", "jamba", "ernie4_5_moe", "hunyuan_v1_moe", "minimax",
}  # fmt: skip


def test_the_table_covers_the_required_families():
    assert set(FAMILIES) >= REQUIRED and len(FAMILIES) >= 20


@pytest.mark.parametrize("family", ALL)
def test_identity_lpr_reproduces_the_model(family):
    result = check_identity(family)
    assert result["identity_max_abs_diff"] <= 1e-5, result
    assert result["router_logits_recorded"] == result["routers"] > 0  # output_router_logits still sees them
    assert result["loss_finite"]  # the aux-loss path runs on the LPR's logits
    assert result["wrong_routing_diff"] > 1e-4  # the comparison can fail: two experts swapped show
    # the compact form (encoder = gate weight, prototypes = identity) computes the same, at the gate's size
    assert result["gate_router_max_abs_diff"] <= 1e-5, result
    assert result["gate_router_latent"] == [FAMILIES[family].num_experts(tiny_model(family).config)]


@pytest.mark.parametrize("family", ALL)
def test_output_contract_and_dtypes_in_bfloat16(family):
    """In bfloat16 the LPR returns the same structure, shapes and dtypes as the router it replaces."""
    model = tiny_model(family, seed=5).to(torch.bfloat16)
    routers = identity_routers(model)
    x = torch.randn(2, 40, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for site in find_routers(model):
        block_args = ()
        if (bias := FAMILIES[family].choice_bias) and bias.startswith("^"):
            block_args = (getattr(model.get_submodule(site.name.rpartition(".")[0]), bias[1:]),)
        flat = router_input(family, x.reshape(-1, x.shape[-1]))
        with torch.no_grad():
            expected = site.module(flat, *block_args)
            got = routers[site.name].to(torch.bfloat16)(flat, *block_args)
        assert type(got) is type(expected) and len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert (mine.shape, mine.dtype) == (theirs.shape, theirs.dtype), site.name
        _, _, indices = as_triple(got, int(site.module.top_k))
        assert int(indices.min()) >= 0 and int(indices.max()) < routers[site.name].num_experts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(make_texts(40))


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL)
def test_end_to_end(family, tmp_path, tokenizer, tiny_corpus):
    result = check_end_to_end(family, tmp_path, tokenizer, tiny_corpus)
    layers = result["moe_layers"]
    assert layers >= 1 and result["family_attr"] == family
    assert result["capture_max_abs_diff"] < 2e-3  # the router recomputed on stored (float16) x
    assert result["lpr_routers"] == layers == result["lpr_router_logits_recorded"]
    experts = FAMILIES[family].num_experts(AutoConfig.from_pretrained(tmp_path / "model"))
    assert result["index_range"][0] >= 0 and result["index_range"][1] < experts
    assert torch.isfinite(torch.tensor(result["lpr_loss"]))
    # save_pretrained → from_pretrained: nothing re-initialised, the LPR comes back from the export
    assert result["reload_missing_keys"] == []
    assert result["reload_vs_original_diff"] <= 1e-5 and result["reload_lpr_diff"] <= 1e-5


@pytest.mark.slow
def test_end_to_end_on_a_full_llama4_checkpoint(tmp_path, tokenizer, tiny_corpus):
    """Released Llama 4 checkpoints are composite (text + vision): the pipeline runs on their text model."""
    from pipeline.testing.tiny_families import save_tiny_llama4_checkpoint

    checkpoint = save_tiny_llama4_checkpoint(tmp_path / "model", tokenizer)
    assert AutoConfig.from_pretrained(checkpoint).model_type == "llama4"
    result = check_end_to_end("llama4_text", tmp_path, tokenizer, tiny_corpus, checkpoint=checkpoint)
    assert result["family_attr"] == "llama4_text" and result["lpr_routers"] == result["moe_layers"] == 2
    assert result["capture_max_abs_diff"] < 2e-3 and torch.isfinite(torch.tensor(result["lpr_loss"]))
    assert result["reload_lpr_diff"] <= 1e-5


def test_model_state_dict_round_trip_with_lpr_routers():
    model = tiny_model("gpt_oss", seed=1)
    install_routers(model, identity_routers(model))
    state = model.state_dict()
    assert "model.layers.0.mlp.router.bias" in state and "model.layers.0.mlp.router.lpr.bias" in state
    assert not torch.equal(state["model.layers.0.mlp.router.lpr.bias"], state["model.layers.0.mlp.router.bias"])
    other = tiny_model("gpt_oss", seed=2)
    install_routers(other, identity_routers(other))
    other.load_state_dict(state)  # LPR tensors back under their own names, originals kept aside
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unsupported_families_get_one_line():
    for model_type, why in UNSUPPORTED.items():
        config = type("Config", (), {"model_type": model_type, "num_local_experts": 8})()
        with pytest.raises(LprError, match=re.escape(why)) as err:
            family_of(config)
        assert "supported families: " + ", ".join(ALL) in str(err.value).lower() and "\n" not in str(err.value)
    unknown = type("Config", (), {"model_type": "my_moe", "num_experts": 8})()
    with pytest.raises(LprError, match=r"MoE family 'my_moe' is not supported yet.*add a Family entry") as err:
        family_of(unknown)
    assert "qwen3_moe" in str(err.value) and "\n" not in str(err.value)
    jetmoe = AutoConfig.for_model("jetmoe")
    with pytest.raises(LprError, match="5-tuple"):
        family_of(jetmoe)


def test_readme_matrix_lists_every_family():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("<!-- compat-matrix:start -->")[1].split("<!-- compat-matrix:end -->")[0]
    for model_type in [*FAMILIES, *UNSUPPORTED]:
        assert f"`{model_type}`" in section, model_type


def test_routers_for_another_weight_convention_are_refused(tmp_path):
    """Routers exported for a DeepSeek-V3 model with one routed scaling do not load into one with another."""
    from pipeline import load_lpr_model
    from storage.routers import write_routers

    model = tiny_model("deepseek_v3", seed=1)
    routers = identity_routers(model)
    spec = next(iter(routers.values())).spec
    tensors = {f"{name}.{key}": value for name, r in routers.items() for key, value in r.state_dict().items()}
    config = {"kind": "identity", "family": "deepseek_v3", "model": "tiny", "spec": spec.to_dict()}
    config["routers"] = list(routers)
    out = write_routers(tmp_path / "routers", tensors, config, "card")
    loaded = load_lpr_model(model, out)  # the same model: fine, and unchanged
    assert all(type(site.module).__name__.startswith("Lpr") for site in find_routers(loaded))
    other = tiny_model("deepseek_v3", seed=1, routed_scaling_factor=1.0)
    with pytest.raises(LprError, match=r"weight convention convention=sigmoid.*scaling=2\.5.*≠ the model's .*=1\.0"):
        load_lpr_model(other, out)


def test_composite_configs_resolve_to_their_text_model():
    """A full Llama 4 checkpoint's config is composite (model_type llama4); AutoModelForCausalLM loads
    its text model, so the family and router spec come from the text config."""
    from pipeline.router.lpr import spec_for
    from pipeline.testing.tiny_families import tiny_config

    text = tiny_config("llama4_text")
    composite = AutoConfig.for_model("llama4", text_config=text.to_dict())
    assert composite.model_type == "llama4" and family_of(composite) == "llama4_text"
    spec = spec_for(composite, latent_dim=8)
    assert (spec.hidden_size, spec.num_experts, spec.top_k, spec.returns) == (64, 8, 2, "scores_logits")


def test_per_layer_lists_are_one_value_or_a_clear_error():
    from pipeline.router.lpr import spec_for
    from pipeline.testing.tiny_families import tiny_config

    same = tiny_config("hunyuan_v1_moe", moe_topk=[2, 2])
    assert (spec_for(same, latent_dim=4).num_experts, spec_for(same, latent_dim=4).top_k) == (8, 2)
    mixed = tiny_config("hunyuan_v1_moe", moe_topk=[2, 1])
    with pytest.raises(LprError, match=r"HunYuan-MoE with a different top-k per layer \(moe_topk=\[2, 1\]\)"):
        spec_for(mixed, latent_dim=4)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "hunyuan_v1_moe", "llama4_text"])
def test_identity_router_from_the_router_module(family):
    """identity_router(router module, spec) reads the gate weight and the router's own biases."""
    from pipeline.router.lpr import identity_router, spec_for
    from pipeline.testing.tiny_families import perturb_gates

    model = tiny_model(family, seed=4)
    perturb_gates(model, family)
    spec = spec_for(model.config, latent_dim=model.config.hidden_size, similarity="dot")
    x = torch.randn(100, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for site in find_routers(model):
        with torch.no_grad():
            expected = site.module(router_input(family, x))
            got = identity_router(site.module, spec)(x)
        assert len(got) == len(expected)
        mine, theirs = as_triple(got, spec.top_k), as_triple(expected, spec.top_k)
        torch.testing.assert_close(mine[0], theirs[0].reshape(mine[0].shape), rtol=0, atol=1e-5)
        (w, i), (w_ref, i_ref) = mine[1:], (t.reshape(mine[1].shape) for t in theirs[1:])
        order, order_ref = i.argsort(-1), i_ref.argsort(-1)  # the same experts, in any order
        assert torch.equal(i.gather(-1, order), i_ref.gather(-1, order_ref))
        torch.testing.assert_close(w.gather(-1, order), w_ref.gather(-1, order_ref), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lm_eval_scores_a_hybrid_family_without_a_kv_cache(tokenizer):
    """lm-eval calls a plain ``model(ids)``; on transformers 5.25 a Nemotron-H (Mamba + attention + MoE)
    breaks on the KV cache that call would build. evaluate_tasks scores it without one and puts the
    config back as it was."""
    pytest.importorskip("lm_eval")
    from pipeline.evaluation.downstream import evaluate_tasks

    model = tiny_model("nemotron_h")
    assert model.config.use_cache
    results = evaluate_tasks(model, tokenizer, ["lpr_demo_cloze"], batch_size=4, limit=4, max_length=256)
    assert results["lpr_demo_cloze"]["samples"] == 4 and 0 <= results["lpr_demo_cloze"]["acc"] <= 1
    assert model.config.use_cache
