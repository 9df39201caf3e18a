"""Where a model's tensors sit in its checkpoint: module state keys ↔ the keys of the safetensors files.

transformers 5 renames checkpoint keys when it loads (Mixtral and MiniMax ``block_sparse_moe.`` →
``mlp.``; PhiMoE ``block_sparse_moe.gate`` → ``mlp.router``; Granite-MoE ``router.layer.weight`` →
``router.weight``; Ernie's and EXAONE-MoE's choice bias moves into the gate; HY-V3 ``router.gate`` →
``gate`` and ``expert_bias`` → ``e_score_correction_bias``; Nemotron-H ``backbone.`` → ``model.``)
and converts some (per-expert weights fused into ``gate_up_proj``). A drop-in checkpoint writes
a router tensor under the key it has in the *source files*, so this module runs the source keys
through transformers' own renaming, as ``from_pretrained`` does, and keeps only plain renames: a
key that reaches the model through a conversion (a split, a merge, a transpose) is no 1:1 copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import LprError


def empty_model(config: Any) -> nn.Module:
    """The model ``AutoModelForCausalLM`` builds for ``config``, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def checkpoint_keys(model: nn.Module, source_keys: Iterable[str]) -> dict[str, str]:
    """Model state key → the source key that loads into it by a plain rename (what ``from_pretrained``
    of transformers 5 does with ``source_keys``). Keys that load through a conversion are left out."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    state = model.state_dict()
    prefix = model.base_model_prefix
    found: dict[str, str] = {}
    for key in source_keys:
        renamed, converter = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:  # as from_pretrained: an unrenamed key that already fits
            renamed, converter = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=state)
        if renamed in state and converter is None:
            found[renamed] = key
    return found


def local_checkpoint(path: str, revision: str | None) -> Path:
    """The local directory of a checkpoint: ``path`` itself, or the hub snapshot of a hub id (cached
    files are used; what is missing is downloaded, weights as safetensors only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    ignore = ["*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "original/*"]
    try:
        return Path(snapshot_download(path, revision=revision, ignore_patterns=ignore))
    except Exception as err:  # network, auth, missing repo: one line either way
        raise LprError(
            f"cannot get the files of model {path} ({str(err).splitlines()[0]})", "pass a local checkpoint directory"
        ) from None
