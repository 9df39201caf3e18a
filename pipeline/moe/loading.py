"""Loading a MoE checkpoint and finding its routers, generically.

Routers are found the way transformers itself records router logits: the base model class
declares ``_can_record_outputs["router_logits"]``, an ``OutputRecorder`` whose ``target_class``
is the router class. Matching by ``isinstance`` (never by a name like ``gate``, which also hits
``gate_proj`` and ``shared_expert_gate``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig, RunConfig
from pipeline.errors import LprError
from pipeline.moe.families import family_of

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router: where it sits in the model."""

    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    layer_index: int  # decoder-layer index
    module: nn.Module


def resolve_model_path(cfg: RunConfig) -> str:
    """The checkpoint to load: ``demo`` is built (once) and cached; anything else is returned as is."""
    if cfg.model.path == "demo":
        from pipeline.demo.model import ensure_demo_model

        return str(ensure_demo_model(cfg.demo, seed=cfg.seed))
    return cfg.model.path


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _check_source(path: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise LprError(
                f"model path {path} is not a directory", "pass the checkpoint's directory (with config.json)"
            )
        if not (local / "config.json").is_file():
            raise LprError(f"model directory {path} has no config.json", "pass a save_pretrained checkpoint directory")
        if not os.access(local / "config.json", os.R_OK):
            raise LprError(f"model directory {path} is not readable", "check its permissions")
    elif _looks_local(path):
        raise LprError(
            f"model path {path} does not exist", "pass an existing checkpoint directory or a hub id as --model"
        )


def resolve_dtype(cfg: ModelConfig, device: str) -> torch.dtype | str:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return "auto" if device.startswith("cuda") else torch.float32


def resolve_device(cfg: ModelConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(cfg: ModelConfig, path: str):
    """The checkpoint's transformers config, checked: it exists, loads, and is a supported MoE family.

    Cheap (no weights), so stages call it before they touch anything in the run directory.
    """
    from transformers import AutoConfig

    _check_source(path)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise LprError(
                f"model {path} needs its own code to load",
                "if you trust it, set model.trust_remote_code: true (--trust-remote-code)",
            ) from None
        raise LprError(
            f"cannot read the config of model {path} ({str(err).splitlines()[0]})", "check --model"
        ) from None
    except OSError as err:
        raise LprError(
            f"cannot load model {path} ({str(err).splitlines()[0]})", "check --model and --revision"
        ) from None
    family_of(config)  # unsupported families and dense models fail here, before any weight is read
    return config


def load_model(cfg: ModelConfig, path: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local directory or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = load_config(cfg, path)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    device = resolve_device(cfg)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(cfg, device), **common}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    if not cfg.device_map:
        model.to(device)
    model.eval()  # some families add router jitter in training mode: capture in eval mode
    return model, load_tokenizer(cfg, path)


def load_tokenizer(cfg: ModelConfig, path: str) -> Any:
    """The checkpoint's tokenizer, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def router_class(model: nn.Module) -> tuple[type[nn.Module], str | None]:
    """The router class that the model's own output recorder targets, and its layer name if any."""
    for module in model.modules():
        recorder = getattr(type(module), "_can_record_outputs", None) or {}
        spec = recorder.get("router_logits")
        if spec is None:
            continue
        target = getattr(spec, "target_class", spec)
        if isinstance(target, type):
            return target, getattr(spec, "layer_name", None)
    name = type(model).__name__
    raise LprError(
        f"model {name} has no MoE layer (transformers records no router logits for it)",
        "point --model at a Mixture-of-Experts checkpoint",
    )


def find_routers(model: nn.Module) -> list[RouterSite]:
    """Every MoE layer's router, in model order. Raises for a dense model."""
    cls, layer_name = router_class(model)
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, cls) and (layer_name is None or name.endswith(layer_name)):
            match = _LAYER_INDEX.search(f".{name}.")
            sites.append(RouterSite(name=name, layer_index=int(match.group(1)) if match else len(sites), module=module))
    if not sites:
        raise LprError(
            f"model {type(model).__name__} has no MoE layer (no {cls.__name__} module)",
            "point --model at a Mixture-of-Experts checkpoint",
        )
    return sites


def model_identity(path: str, revision: str | None) -> dict[str, Any]:
    """What identifies a checkpoint cheaply: its config, tokenizer and the ends of each weight file.

    Hashing 60 GB of weights would take minutes; the size plus the first and last MiB of each
    weight file (safetensors headers included) catch any re-save or swap in practice.
    """
    local = Path(path).expanduser()
    if not local.is_dir():
        return {"model": path, "revision": revision}
    digest = hashlib.sha256()
    for file in sorted(local.iterdir()):
        if file.suffix in (".json", ".txt", ".model", ".jinja"):
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt"):
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(2**20))
                handle.seek(max(0, size - 2**20))
                digest.update(handle.read(2**20))
    return {"model": str(local.resolve()), "revision": revision, "hash": digest.hexdigest()[:16]}
