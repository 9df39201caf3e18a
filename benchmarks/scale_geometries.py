"""The reference geometries of ``benchmarks/scale.py``: published config values, what the benchmark
builds from them, and the forward FLOPs per token that its extrapolation scales by.

Every value under ``published`` is copied from the checkpoint's ``config.json`` on the Hugging Face
hub (the repository in ``source``, main branch as of 2026-12-07), under transformers' key names. The
benchmark builds a randomly initialised model of that family from them with ``--layers`` MoE layers;
``reduced`` lists what it builds smaller than published, and why (the JSON line repeats it). Not
copied, since they change neither widths nor cost: rotary settings (rope_theta, YaRN scaling),
dropout, initialiser range, and GPT-OSS's MXFP4 quantisation (the benchmark's weights are float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Geometry:
    name: str
    model_type: str
    source: str  # hub repository of the published config.json
    moe_layers: int  # MoE layers of the full model
    dense_layers: int  # dense (non-MoE) decoder layers of the full model
    published: dict[str, Any]  # config.json values, transformers' keys
    reduced: dict[str, Any] = field(default_factory=dict)  # built below the published value (see `why`)
    why: str = ""
    tokens: int = 32_768  # the benchmark's default dump budget (its run fits 30 minutes on 2 cores)
    sample: int = 16_384  # the benchmark's per-layer sample sizes (cluster, calibration): ≤ tokens, so a
    # run with 2× the tokens has the same configured memory (the memory-scaling check)

    @property
    def hidden(self) -> int:
        return int(self.published["hidden_size"])

    @property
    def experts(self) -> int:
        p = self.published
        return int(p.get("num_experts") or p.get("num_local_experts") or p["n_routed_experts"])

    @property
    def top_k(self) -> int:
        return int(self.published["num_experts_per_tok"])

    @property
    def vocab(self) -> int:
        return int(self.published["vocab_size"])

    def expert_width(self, built: bool = False) -> int:
        source = self.published | (self.reduced if built else {})
        return int(source.get("moe_intermediate_size") or source["intermediate_size"])


GEOMETRIES: dict[str, Geometry] = {
    g.name: g
    for g in (
        Geometry(
            "qwen3-30b-a3b",
            "qwen3_moe",
            "Qwen/Qwen3-30B-A3B",
            moe_layers=48,
            dense_layers=0,
            published=dict(
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                vocab_size=151936,
            ),
        ),
        Geometry(
            "olmoe-1b-7b",
            "olmoe",
            "allenai/OLMoE-1B-7B-0924",
            moe_layers=16,
            dense_layers=0,
            published=dict(
                hidden_size=2048,
                intermediate_size=1024,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=64,
                num_experts_per_tok=8,
                norm_topk_prob=False,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                vocab_size=50304,
            ),
        ),
        Geometry(
            "mixtral-8x7b",
            "mixtral",
            "mistralai/Mixtral-8x7B-v0.1",
            moe_layers=32,
            dense_layers=0,
            published=dict(
                hidden_size=4096,
                intermediate_size=14336,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                vocab_size=32000,
            ),
            tokens=4_096,  # ≈ 1.6 GFLOP per token in 2 layers: about 20 tokens/s on 2 cores
            sample=2_048,
        ),
        Geometry(
            "gpt-oss-20b",
            "gpt_oss",
            "openai/gpt-oss-20b",
            moe_layers=24,
            dense_layers=0,
            published=dict(
                hidden_size=2880,
                intermediate_size=2880,
                num_attention_heads=64,
                num_key_value_heads=8,
                head_dim=64,
                num_local_experts=32,
                num_experts_per_tok=4,
                sliding_window=128,
                attention_bias=True,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                vocab_size=201088,
            ),
            tokens=16_384,
            sample=8_192,
        ),
        Geometry(
            "deepseek-v3",
            "deepseek_v3",
            "deepseek-ai/DeepSeek-V3",
            moe_layers=58,
            dense_layers=3,
            published=dict(
                hidden_size=7168,
                intermediate_size=18432,
                moe_intermediate_size=2048,
                num_attention_heads=128,
                num_key_value_heads=128,
                q_lora_rank=1536,
                kv_lora_rank=512,
                qk_nope_head_dim=128,
                qk_rope_head_dim=64,
                v_head_dim=128,
                n_routed_experts=256,
                n_shared_experts=1,
                num_experts_per_tok=8,
                n_group=8,
                topk_group=4,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                first_k_dense_replace=3,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                vocab_size=129280,
            ),
            # one MoE layer's routed experts at width 2048 are 256 × 3 × 7168 × 2048 × 4 B = 45 GB in float32
            reduced={"moe_intermediate_size": 64, "first_k_dense_replace": 0},
            why="routed experts at width 64 (true width: 45 GB per layer in float32) and no dense layers; "
            "routers, states, cluster, gate-level distillation and calibration are at true H, E, top-k and groups; "
            "dump, model-level distillation and validation leave out 97 % of the routed-expert FLOPs "
            "(the extrapolation scales by the true FLOPs)",
            tokens=8_192,
            sample=4_096,
        ),
    )
}


def build_config(geometry: Geometry, *, layers: int, tokenizer: Any):
    """The transformers config of ``geometry`` with ``layers`` MoE layers (and its reductions)."""
    from transformers import AutoConfig

    values = geometry.published | geometry.reduced | {"num_hidden_layers": layers}
    if geometry.model_type == "gpt_oss":  # the published pattern: sliding, full, sliding, …
        values["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    return AutoConfig.for_model(geometry.model_type, **values, **ids)


def build_checkpoint(
    geometry: Geometry, *, layers: int, tokenizer: Any, path: Path, dtype: torch.dtype, seed: int = 0
) -> int:
    """A random-initialised checkpoint of ``geometry`` at ``path``, its weights stored in ``dtype`` (the
    dtype the pipeline loads it in: loading float32 weights from bfloat16 files peaks at 1.55× the float32
    weights in anonymous memory, from float32 files 1.19×, measured). Returns its parameter count."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(geometry, layers=layers, tokenizer=tokenizer))
    count = sum(p.numel() for p in model.parameters())
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return count


def _attention_params(g: Geometry) -> int:
    p, h = g.published, g.hidden
    if g.model_type == "deepseek_v3":  # multi-head latent attention
        heads, qk = p["num_attention_heads"], p["qk_nope_head_dim"] + p["qk_rope_head_dim"]
        q = h * p["q_lora_rank"] + p["q_lora_rank"] * heads * qk
        kv = h * (p["kv_lora_rank"] + p["qk_rope_head_dim"])
        kv += p["kv_lora_rank"] * heads * (p["qk_nope_head_dim"] + p["v_head_dim"])
        return q + kv + heads * p["v_head_dim"] * h
    head_dim = p.get("head_dim") or h // p["num_attention_heads"]
    q = p["num_attention_heads"] * head_dim
    kv = p["num_key_value_heads"] * head_dim
    return h * q + 2 * h * kv + q * h


def layer_flops(g: Geometry, *, built: bool = False) -> float:
    """Forward FLOPs per token of one MoE layer (2 × the active weights: attention projections, the
    top-k experts, shared experts and the router); ``built``: with the benchmark's reductions."""
    width = g.expert_width(built)
    shared = 3 * g.hidden * width * int(g.published.get("n_shared_experts", 0))
    active = _attention_params(g) + g.top_k * 3 * g.hidden * width + shared + g.hidden * g.experts
    return 2.0 * active


def dense_layer_flops(g: Geometry) -> float:
    """Forward FLOPs per token of one dense decoder layer (DeepSeek-V3's first three)."""
    return 2.0 * (_attention_params(g) + 3 * g.hidden * int(g.published["intermediate_size"]))


def head_flops(g: Geometry) -> float:
    """Forward FLOPs per token of the LM head."""
    return 2.0 * g.hidden * g.vocab


def model_bytes(g: Geometry, *, layers: int | None = None, built: bool = False, dtype_bytes: int = 2) -> float:
    """Bytes of the weights (embedding and head included) of the full model or of ``layers`` MoE layers."""
    width = g.expert_width(built)
    per_layer = _attention_params(g) + g.experts * 3 * g.hidden * width + g.hidden * g.experts
    per_layer += 3 * g.hidden * width * int(g.published.get("n_shared_experts", 0))
    dense = 0 if layers is not None else g.dense_layers * dense_layer_flops(g) / 2
    count = per_layer * (layers if layers is not None else g.moe_layers) + dense + 2 * g.hidden * g.vocab
    return count * dtype_bytes
