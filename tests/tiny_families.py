"""Tiny random models of every supported MoE family, built with ``from_config`` (no network).

Hidden 64, 2–3 layers, 8 experts, top-2, vocab of the tiny BPE tokenizer; the family table's
``tiny`` entry adds what a family needs to build small (layer types, group settings, …).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.families import FAMILIES

_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token")
_SMALL_WIDTHS = (
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "intermediate_size_mlp",
)
_MLA = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def tiny_config(
    family: str, *, vocab_size: int = 300, pad_token_id: int | None = None, eos_token_id: int | None = None
):
    """A transformers config of ``family`` at test size: hidden 64, 8 experts, top-2."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(family).to_dict()
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
    )
    kw |= {key: 8 for key in _EXPERTS if key in defaults}
    kw |= {key: 2 for key in _TOP_K if key in defaults}
    kw |= {key: 32 for key in _SMALL_WIDTHS if defaults.get(key)}
    kw |= {key: 0 for key in ("first_k_dense_replace", "num_dense_layers") if key in defaults}
    kw |= {key: 1 for key in ("n_group", "topk_group") if defaults.get(key) is not None}
    kw |= {key: 8 for key in _MLA if defaults.get(key)}
    if defaults.get("kv_lora_rank"):
        kw["head_dim"] = 8  # multi-head latent attention: head_dim is the rotary part
    for key in ("linear_key_head_dim", "linear_value_head_dim", "index_head_dim"):
        if defaults.get(key):
            kw[key] = 8
    for key in ("linear_num_key_heads", "linear_num_value_heads", "index_n_heads"):
        if defaults.get(key):
            kw[key] = 4
    kw |= FAMILIES[family].tiny
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    if eos_token_id is not None:
        kw["eos_token_id"] = eos_token_id
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, *, seed: int = 0, **config: Any):
    """A randomly initialised float32 model of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **config), dtype=torch.float32).eval()


def save_tiny_family(path: Path, family: str, tokenizer, *, seed: int = 0) -> Path:
    """A checkpoint of ``family`` (save_pretrained) with ``tokenizer``, ready for the pipeline."""
    model = tiny_model(
        family,
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A whole run at toy size: seconds per family. Every stage runs its real code.
FAST_RUN: dict[str, dict[str, Any]] = {
    "dump": {"max_tokens": 640, "batch_tokens": 128, "chunk_rows": 128},
    "cluster": {"latent_dim": 8, "iterations": 3},
    "router": {"calibration_rows": 256},
    "distill": {
        "steps": 10,
        "batch_rows": 64,
        "buffer_rows": 256,
        "eval_every": 5,
        "val_rows": 64,
        "model_steps": 2,
        "model_batch_sequences": 2,
        "model_val_sequences": 2,
        "model_eval_every": 1,
        "calibration_sequences": 4,
    },
}


def _logits(model, ids: torch.Tensor, **kwargs: Any):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs)


def perturb_gates(model, family: str, seed: int = 0) -> None:
    """Random gate weights (spread logits), logit and choice biases, so that a wrong convention shows."""
    from pipeline.models import find_routers
    from pipeline.replace import block_of

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in find_routers(model):
            weight, logit_bias, choice_bias = FAMILIES[family].gate_tensors(site.module, block_of(model, site))
            weight.copy_(torch.randn(weight.shape, generator=gen))
            if logit_bias is not None:
                logit_bias.copy_(torch.randn(logit_bias.shape, generator=gen))
            if choice_bias is not None:
                choice_bias.copy_(torch.rand(choice_bias.shape, generator=gen).reshape(choice_bias.shape) * 0.1)


def check_identity(family: str) -> dict[str, Any]:
    """Identity-configured LPRs in place of every router: the model's logits unchanged (float32),
    router logits still recorded, the aux loss computed; a swapped pair of prototypes changes them."""
    from transformers import AutoModelForCausalLM

    from pipeline.replace import identity_routers, install_routers

    model = tiny_model(family, seed=3)
    perturb_gates(model, family)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = _logits(model, ids, output_router_logits=True)
    swapped = AutoModelForCausalLM.from_config(model.config).eval()
    swapped.load_state_dict(model.state_dict())
    routers = identity_routers(swapped)
    install_routers(swapped, routers)
    got = _logits(swapped, ids, output_router_logits=True, labels=ids)
    result = {
        "identity_max_abs_diff": float((got.logits - expected.logits).abs().max()),
        "router_logits_recorded": len(got.router_logits or ()),
        "routers": len(routers),
        "loss_finite": bool(torch.isfinite(got.loss)),
    }
    first = next(iter(routers.values()))
    with torch.no_grad():
        first.prototypes[[0, 1]] = first.prototypes[[1, 0]]  # experts 0 and 1 trade places
    result["wrong_routing_diff"] = float((_logits(swapped, ids).logits - expected.logits).abs().max())
    return result
