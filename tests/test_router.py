"""The LPR router: it generalises the linear gate (identity configuration reproduces it), and a
model with LPR routers in place runs unchanged, router-logit capture included."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.moe.loading import find_routers
from pipeline.router.install import install_routers
from pipeline.router.lpr import LatentPrototypeRouter, RouterSpec, identity_router, spec_for
from tests.conftest import save_tiny_moe

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    path = save_tiny_moe(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, model


def test_identity_router_reproduces_the_gate(family_model):
    _, model = family_model
    spec = spec_for(model.config, latent_dim=model.config.hidden_size, similarity="dot")
    torch.manual_seed(0)
    x = torch.randn(257, model.config.hidden_size)
    for site in find_routers(model):
        lpr = identity_router(site.module.weight, spec)
        expected = site.module(x)
        got = lpr(x)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
        assert torch.equal(got[2], expected[2])  # the same experts, in the same order
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
        assert got[1].dtype == expected[1].dtype


def test_model_with_identity_routers_is_unchanged(family_model):
    family, model = family_model
    spec = spec_for(model.config, latent_dim=model.config.hidden_size, similarity="dot")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    swapped = AutoModelForCausalLM.from_config(model.config).eval()
    swapped.load_state_dict(model.state_dict())
    routers = {site.name: identity_router(site.module.weight, spec) for site in find_routers(swapped)}
    install_routers(swapped, routers)
    assert all(isinstance(site.module, LatentPrototypeRouter) for site in find_routers(swapped))
    with torch.no_grad():
        got = swapped(ids, output_router_logits=True, labels=ids)
    assert (got.logits - expected.logits).abs().max() <= 1e-5, family
    assert len(got.router_logits) == len(expected.router_logits) > 0  # capture still sees the routers
    assert torch.isfinite(got.loss)


def test_bias_moves_the_choice_not_the_weights():
    spec = RouterSpec(hidden_size=8, num_experts=4, top_k=2, latent_dim=3, renormalize=False)
    router = LatentPrototypeRouter(spec).eval()
    x = torch.randn(50, 8)
    logits, _, indices = router(x)
    router.bias[indices[0, 0]] = -10.0  # make the first token's favourite unattractive
    _, weights, moved = router(x)
    assert indices[0, 0] not in moved[0].tolist()
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(weights, probs.gather(-1, moved))  # weights: unbiased probabilities


@pytest.mark.parametrize("similarity", ["cosine", "dot", "gaussian", "mahalanobis"])
def test_every_similarity_gives_valid_routing(similarity):
    spec = RouterSpec(hidden_size=16, num_experts=6, top_k=2, latent_dim=4, similarity=similarity)
    router = LatentPrototypeRouter(spec)
    logits, weights, indices = router(torch.randn(3, 5, 16))
    assert logits.shape == (15, 6) and weights.shape == indices.shape == (15, 2)
    assert int(indices.min()) >= 0 and int(indices.max()) < 6
    torch.testing.assert_close(weights.sum(-1), torch.ones(15))
    logits.sum().backward()  # differentiable end to end
    assert router.encoder.weight.grad is not None


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "phimoe", "qwen3_moe"])
def test_bias_calibration_balances_choice_rules_the_auction_does_not_model(family):
    """Group-limited top-k (DeepSeek, GLM) and sparsemixer (PhiMoE) are not a top-k of score + bias, so the
    auction's prices alone leave them uneven ([57, 83] slots on a tiny DeepSeek-V3 before the refinement)."""
    from pipeline.router.from_clusters import calibrate_bias
    from pipeline.router.lpr import spec_for
    from pipeline.testing.tiny_families import tiny_config

    config = tiny_config(family, n_group=4, topk_group=2) if family == "deepseek_v3" else tiny_config(family)
    spec = spec_for(config, latent_dim=16, similarity="dot")
    torch.manual_seed(0)
    router = LatentPrototypeRouter(spec)
    with torch.no_grad():
        router.prototypes.copy_(torch.randn_like(router.prototypes) + torch.linspace(0, 1.5, spec.num_experts)[:, None])
    z = torch.randn(4000, 16)
    result = calibrate_bias(router, router.latent_scores(z).detach())
    mean = 4000 * spec.top_k / spec.num_experts
    assert result["slots_max"] - result["slots_min"] <= max(4, 0.03 * mean), result
    _, indices = router.route(router.latent_scores(z))
    slots = torch.bincount(indices.reshape(-1), minlength=spec.num_experts)
    assert (int(slots.min()), int(slots.max())) == (result["slots_min"], result["slots_max"])


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_the_temperature_reaches_the_teachers_top1(family):
    """A sigmoid router's renormalised top-k weights are even both for flat and for saturated logits, so the
    temperature is calibrated on its top sigmoid score there (on the top weight, of any of the k, elsewhere):
    it lands inside the search range and matches the teacher, instead of saturating at the range's end."""
    from pipeline.router.from_clusters import calibrate_temperature, top1
    from pipeline.testing.tiny_families import tiny_config

    config = tiny_config(family, n_group=4, topk_group=2) if family == "deepseek_v3" else tiny_config(family)
    spec = spec_for(config, latent_dim=16, similarity="cosine")
    torch.manual_seed(0)
    router = LatentPrototypeRouter(spec)
    z = torch.randn(4000, 16)
    teacher = 3.0 * torch.randn(4000, spec.num_experts)  # a gate's logits
    weights, _ = router.route(teacher)
    unsorted = weights.flip(-1)  # DeepSeek-V3 returns its top-k unsorted: the largest need not come first
    target = float(top1(teacher, unsorted, spec.convention).mean())
    temperature = calibrate_temperature(router, z, target)
    assert 1e-3 * 1.01 < temperature < 1e4 * 0.99
    logits = router.latent_scores(z).detach()
    assert float(top1(logits, router.route(logits)[0], spec.convention).mean()) == pytest.approx(target, abs=1e-3)
