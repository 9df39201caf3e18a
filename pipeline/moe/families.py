"""The MoE families the pipeline supports: data, one ``Family`` entry per family (adding a family is
one entry; what an entry says is documented in ``pipeline/family_adapter.py``), and the lookups.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import LprError
from pipeline.moe.family import Family


def _deepseek(model_type: str, name: str, **kw: Any) -> Family:
    """DeepSeek-V3's router: sigmoid, choice on score + e_score_correction_bias, group-limited top-k
    (groups ranked by the sum of their best two), weights renormalised if norm_topk_prob, × routed_scaling_factor."""
    return Family(
        model_type,
        name,
        "sigmoid",
        "sigmoid (fp32); choice on score + e_score_correction_bias, group-limited top-k; "
        "renormalise if norm_topk_prob (+1e-20); × routed_scaling_factor",
        **{
            "experts": "n_routed_experts",
            "renorm_eps": 1e-20,
            "scaling": "routed_scaling_factor",
            "groups": ("n_group", "topk_group"),
            "logits_fp32": True,
            "weights_dtype": "float32",
            "choice_bias": "e_score_correction_bias",
            "receives": "x [B, S, H]",
            **kw,
        },
    )


_SOFTMAX = "softmax → top-k → renormalise if norm_topk_prob; weights in the logits' dtype"

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "Qwen3-MoE", "softmax", _SOFTMAX),
        Family("qwen2_moe", "Qwen2-MoE", "softmax", _SOFTMAX),
        Family(
            "qwen3_next",
            "Qwen3-Next",
            "softmax",
            _SOFTMAX,
            tiny={"layer_types": ["linear_attention", "full_attention"]},
        ),
        Family(
            "qwen3_5_moe_text",
            "Qwen3.5-MoE",
            "softmax",
            "softmax → top-k → renormalise; weights in the logits' dtype",
            renormalize=True,
            tiny={"layer_types": ["linear_attention", "full_attention"]},
        ),
        Family("olmoe", "OLMoE", "softmax", _SOFTMAX),
        Family("flex_olmo", "FlexOlmo", "softmax", _SOFTMAX, tiny={"pad_token_id": 1}),
        Family("mellum", "Mellum", "softmax", _SOFTMAX, experts="num_local_experts"),
        Family(
            "mixtral",
            "Mixtral",
            "softmax",
            "softmax (fp32) → top-k → renormalise; weights fp32",
            experts="num_local_experts",
            renormalize=True,
            weights_dtype="float32",
        ),
        Family(
            "minimax",
            "MiniMax",
            "softmax",
            "softmax (fp32) → top-k → renormalise; weights fp32",
            experts="num_local_experts",
            renormalize=True,
            weights_dtype="float32",
        ),
        Family(
            "jamba",
            "Jamba",
            "softmax",
            "softmax → top-k, no renormalisation; weights in the input's dtype",
            renormalize=False,
            weights_dtype="input",
            tiny={
                "attn_layer_period": 2,
                "attn_layer_offset": 1,
                "expert_layer_period": 1,
                "expert_layer_offset": 0,
                "use_mamba_kernels": False,
            },
        ),
        Family(
            "hunyuan_v1_moe",
            "HunYuan-MoE",
            "softmax",
            "softmax (fp32 gate) → top-k → renormalise",
            top_k="moe_topk",
            renormalize=True,
            gate="wg.weight",
        ),
        Family(
            "ernie4_5_moe",
            "Ernie 4.5-MoE",
            "softmax",
            "softmax (fp32); choice on probability + moe_statics bias; renormalise (denominator ≥ moe_norm_min)",
            experts="moe_num_experts",
            top_k="moe_k",
            renormalize=True,
            renorm_min="moe_norm_min",
            logits_fp32=True,
            weights_dtype="input",
            choice_bias="moe_statics.e_score_correction_bias",
            tiny={"num_hidden_layers": 3},
        ),
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            "softmax",
            "softmax (fp32) → greedy or group-limited (groups ranked by their best) top-k → × routed_scaling_factor",
            experts="n_routed_experts",
            renormalize=False,
            scaling="routed_scaling_factor",
            groups=("n_group", "topk_group"),
            group_score="max",
            group_switch=("topk_method", "group_limited_greedy"),
            logits_fp32=True,
            weights_dtype="float32",
            receives="x [B, S, H]",
            tiny={"n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5},
        ),
        _deepseek(
            "deepseek_v3",
            "DeepSeek-V3",
            tiny={
                "n_group": 4,
                "topk_group": 2,
                "routed_scaling_factor": 2.5,
                "first_k_dense_replace": 1,
                "num_hidden_layers": 3,
            },
        ),
        _deepseek("deepseek_v32", "DeepSeek-V3.2", tiny={"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}),
        _deepseek("glm4_moe", "GLM-4-MoE", tiny={"n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5}),
        _deepseek("glm4_moe_lite", "GLM-4-MoE-Lite", tiny={"routed_scaling_factor": 1.8, "num_hidden_layers": 3}),
        _deepseek("dots1", "dots.llm1", tiny={"n_shared_experts": 1}),
        _deepseek("solar_open", "Solar Open"),
        _deepseek("exaone_moe", "EXAONE-MoE", experts="num_experts"),
        _deepseek("glm_moe_dsa", "GLM-MoE-DSA"),
        _deepseek("hy_v4", "HY-V4", tiny={"pad_token_id": 1, "num_hidden_layers": 3}),
        _deepseek("mimo_v2_flash", "MiMo-V2-Flash", tiny={"num_key_value_heads": 2, "num_hidden_layers": 3}),
        _deepseek(
            "nemotron_h",
            "Nemotron-H",
            tiny={"layers_block_type": ["moe", "full_attention", "moe"], "num_hidden_layers": 3},
        ),
        Family(
            "hy_v3",
            "HY-V3",
            "sigmoid",
            "sigmoid (fp32); choice on score + the block's e_score_correction_bias; renormalise (+1e-20); "
            "× router_scaling_factor",
            renormalize=True,
            renorm_eps=1e-20,
            scaling="router_scaling_factor",
            logits_fp32=True,
            weights_dtype="float32",
            choice_bias="^e_score_correction_bias",
            receives="x [T, H], block's bias",
            tiny={"num_hidden_layers": 3},
        ),
        Family(
            "afmoe",
            "AFMoE",
            "sigmoid",
            "sigmoid (fp32); choice on score + the block's expert_bias; renormalise (+1e-20); × route_scale",
            renormalize=True,
            renorm_eps=1e-20,
            scaling="route_scale",
            logits_fp32=True,
            weights_dtype="float32",
            gate="gate.weight",
            choice_bias="^expert_bias",
            receives="x [B, S, H], block's bias",
        ),
        Family(
            "lfm2_moe",
            "LFM2-MoE",
            "sigmoid",
            "sigmoid; choice on score + the block's expert_bias; renormalise if norm_topk_prob (+1e-6); "
            "× routed_scaling_factor",
            renorm_eps=1e-6,
            scaling="routed_scaling_factor",
            choice_bias="^expert_bias",
            receives="x [T, H], block's bias",
            tiny={"layer_types": ["full_attention", "full_attention"]},
        ),
        Family(
            "gpt_oss",
            "GPT-OSS",
            "topk_softmax",
            "top-k on logits (weight + bias) → softmax over the k",
            experts="num_local_experts",
            logit_bias="bias",
        ),
        Family(
            "granitemoe",
            "Granite-MoE",
            "topk_softmax",
            "top-k on logits (fp32) → softmax over the k; weights in the input's dtype",
            experts="num_local_experts",
            logits_fp32=True,
            weights_dtype="input",
        ),
        Family(
            "granitemoeshared",
            "Granite-MoE-Shared",
            "topk_softmax",
            "top-k on logits (fp32) → softmax over the k; weights in the input's dtype",
            experts="num_local_experts",
            logits_fp32=True,
            weights_dtype="input",
        ),
        Family(
            "granitemoehybrid",
            "Granite-MoE-Hybrid",
            "topk_softmax",
            "top-k on logits (fp32) → softmax over the k; weights in the input's dtype",
            experts="num_local_experts",
            logits_fp32=True,
            weights_dtype="input",
            tiny={"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16},
        ),
        Family(
            "cohere2_moe",
            "Command-A-MoE (Cohere2-MoE)",
            "topk_softmax",
            "top-k on logits → softmax over the k (expert_selection_fn=softmax); weights in the input's dtype",
            weights_dtype="input",
        ),
        Family(
            "llama4_text",
            "Llama 4",
            "llama4",
            "top-k on logits → sigmoid of the k as dense [T, E] scores (0 elsewhere); experts see score-scaled x",
            experts="num_local_experts",
            returns="scores_logits",
        ),
        Family(
            "phimoe",
            "PhiMoE",
            "sparsemixer",
            "sparsemixer at inference: top-2, each weight a softmax masked around its logit (router_jitter_noise)",
            experts="num_local_experts",
            jitter="router_jitter_noise",
        ),
        Family(
            "minimax_m2",
            "MiniMax-M2",
            "sigmoid",
            "sigmoid (fp32); choice on score + the block's e_score_correction_bias; renormalise; weights fp32",
            experts="num_local_experts",
            renormalize=True,
            weights_dtype="float32",
            choice_bias="^e_score_correction_bias",
            receives="x [T, H], block's bias",
        ),
        Family(
            "kolibri1",
            "Kolibri",
            "topk_sigmoid",
            "top-k of logits (fp32) + e_score_correction_bias → sigmoid of the k; renormalise if norm_topk_prob",
            experts="num_local_experts",
            logits_fp32=True,
            weights_dtype="float32",
            choice_bias="e_score_correction_bias",
        ),
    )
}

# Families whose router cannot take the LPR's place by the common contract: model_type → why.
UNSUPPORTED: dict[str, str] = {
    "jetmoe": "its JetMoeTopKGating returns a 5-tuple and also gates attention experts",
    "dbrx": "its router returns logits only; top-k happens in DbrxFFN.route_tokens_to_experts",
    "doge": "its CDMoE block routes by product keys, with no (logits, weights, indices) router",
    "switch_transformers": "it is an encoder-decoder with top-1 capacity routing that drops tokens",
    "nllb_moe": "it is an encoder-decoder with top-2 capacity routing that drops tokens",
    "zaya": "its router has its own hidden layer (router_hidden_size) and top-1 only",
}


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def text_config(config: Any) -> Any:
    """The config that describes the MoE decoder: ``config`` itself, or the text config of a
    composite one (a full Llama 4 or Qwen3.5-MoE checkpoint, which AutoModelForCausalLM loads as
    its text model)."""
    if getattr(config, "model_type", None) in FAMILIES:
        return config
    get_text_config = getattr(config, "get_text_config", None)
    inner = get_text_config() if callable(get_text_config) else None
    return inner if getattr(inner, "model_type", None) in FAMILIES else config


def family_of_router(router: nn.Module) -> Family:
    """The family of a router module, from the transformers module that defines its class."""
    cls = next((c for c in type(router).__mro__ if c.__module__.startswith("transformers.models.")), None)
    folder = cls.__module__.split(".")[2] if cls is not None else None
    for key in (folder, f"{folder}_text"):
        if key in FAMILIES:
            return FAMILIES[key]
    raise LprError(
        f"router class {type(router).__name__} belongs to no supported family",
        f"supported families: {_supported()}",
    )


def family_of(config: Any) -> str:
    """The family key of a transformers config; a one-line error for families not in the table."""
    model_type = getattr(text_config(config), "model_type", None)
    if model_type in FAMILIES:
        return model_type
    model_type = getattr(config, "model_type", None)
    how = "to add one, add a Family entry to pipeline/families.py (router contract and weight convention)"
    if model_type in UNSUPPORTED:
        raise LprError(
            f"MoE family '{model_type}' is not supported: {UNSUPPORTED[model_type]}",
            f"supported families: {_supported()}; {how}",
        )
    if any(
        getattr(config, key, None)
        for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "moe_topk")
    ):
        raise LprError(f"MoE family '{model_type}' is not supported yet", f"supported families: {_supported()}; {how}")
    raise LprError(
        f"model type '{model_type}' is a dense model with no MoE layer to distil",
        f"point --model at a Mixture-of-Experts checkpoint (supported families: {_supported()})",
    )
