"""The demo model's architecture per family, and what its routers decided in a forward pass.

``qwen3_moe`` (the default): softmax router, top-k renormalised, no bias tensor — the family most
users bring, where a drop-in checkpoint carries the gate weight only. ``deepseek_v3``: sigmoid
router, top-k within the best groups, choice on score + ``e_score_correction_bias``, a shared
expert, a dense first layer and multi-head latent attention — how most large open MoE models of
2025–26 route, and where a drop-in checkpoint carries weight and choice bias.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DemoConfig

DEEPSEEK_GROUPS = 4  # expert groups of the deepseek_v3 demo (demo.num_experts must be a multiple)


def model_config(cfg: DemoConfig, tokenizer) -> Any:
    """The transformers config of the demo model of ``cfg.family``, sized by ``cfg``."""
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_width * 2,
        "moe_intermediate_size": cfg.expert_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": True,
        "max_position_embeddings": max(512, cfg.seq_len),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    if cfg.family == "deepseek_v3":
        from transformers import DeepseekV3Config

        head = cfg.hidden_size // cfg.num_heads
        return DeepseekV3Config(
            **common,
            n_routed_experts=cfg.num_experts,
            n_shared_experts=1,
            n_group=DEEPSEEK_GROUPS,  # top-k within the best 2 of 4 groups of experts (V3: 4 of 8)
            topk_group=DEEPSEEK_GROUPS // 2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,  # a dense first layer, as DeepSeek-V3 has three
            q_lora_rank=cfg.hidden_size // 2,
            kv_lora_rank=cfg.hidden_size // 4,
            qk_rope_head_dim=head // 4,
            qk_nope_head_dim=head - head // 4,
            v_head_dim=head,
            num_mtp_layers=0,
            tie_word_embeddings=False,
            # as DeepSeek-V3's own config.json says (transformers reads neither; llama.cpp's converter and
            # vLLM read scoring_func, and without it llama.cpp's deepseek2 graph would route by softmax)
            scoring_func="sigmoid",
            topk_method="noaux_tc",
        )
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **common,
        head_dim=cfg.hidden_size // cfg.num_heads,
        num_experts=cfg.num_experts,
        router_aux_loss_coef=0.0,  # the demo's balance loss is per layer (pipeline/demo/model.py)
        tie_word_embeddings=True,
    )


def build_model(cfg: DemoConfig, tokenizer) -> nn.Module:
    """A freshly initialised demo model of ``cfg.family``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config(cfg, tokenizer))


def demo_routers(model: nn.Module) -> list[nn.Module]:
    """The demo model's router modules, in layer order; each returns (logits, weights, indices). (Not
    ``pipeline.moe.loading.find_routers``: model loading builds the demo, so the demo does not import it.)"""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return [module for module in model.modules() if isinstance(module, (Qwen3MoeTopKRouter, DeepseekV3TopkRouter))]


@contextmanager
def routing(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, the list holds each MoE layer's (logits (T, E), chosen experts (T, k)) of the
    last forward pass, logits with their gradient: what the demo's balance loss and load figures read."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
        logits, _, indices = output
        records.append((logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1])))

    handles = [module.register_forward_hook(record) for module in demo_routers(model)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def per_layer_balance_loss(records: list[tuple[torch.Tensor, torch.Tensor]], convention: str) -> torch.Tensor:
    """The Switch-Transformer balance loss computed for each layer, then averaged.

    records: one (logits (T, E), chosen (T, k)) per MoE layer. Per layer: E · Σ_e f_e · P_e, where f_e
    is expert e's share of the chosen slots and P_e its mean routing probability (1 when even):
    softmax for a softmax router, the normalised sigmoid scores for a sigmoid one (DeepSeek-V3's
    sequence-wise balance loss).
    """
    losses = []
    for logits, chosen in records:
        if convention == "sigmoid":
            scores = logits.float().sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = logits.float().softmax(-1)  # (T, E)
        num_experts = probs.shape[-1]
        slots = F.one_hot(chosen, num_experts).sum(1).float().mean(0) / chosen.shape[-1]  # (E,)
        losses.append(num_experts * (slots * probs.mean(0)).sum())
    return torch.stack(losses).mean()
