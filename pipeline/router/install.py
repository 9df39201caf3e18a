"""Put LPR routers in place of a model's routers so that the model runs unchanged around them.

The replacement is an instance of a class derived from both ``LatentPrototypeRouter`` and the
family's own router class, so ``isinstance`` checks still match: transformers' router-logit
recorder (``output_router_logits=True``) keeps capturing, and the aux-loss path keeps working.
The LPR returns what the family's router returns (``pipeline.moe.families``), in its dtypes.

``save_pretrained`` of a model with LPR routers: the model's state dict keeps each original
router's tensors under their own keys (``mlp.gate.weight`` …) and puts the LPR's under
``<router>.lpr.*``, so the checkpoint loads into the stock class with nothing re-initialised
(the LPR keys are reported as unexpected), and ``load_lpr_model`` reads the LPR back from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.loading import RouterSite, find_routers
from pipeline.router.lpr import LatentPrototypeRouter, RouterSpec, gate_router, identity_router, spec_for

_SWAP_CLASSES: dict[type, type] = {}
_ORIGINAL = "_lpr_original_state"  # plain attribute of an installed LPR: the original router's tensors
LPR_PREFIX = "lpr."  # where an installed LPR's own tensors go in the model's state dict


def swap_class(original: type) -> type:
    """LatentPrototypeRouter's behaviour under the family router's type (one class per family)."""
    if original not in _SWAP_CLASSES:
        _SWAP_CLASSES[original] = type(f"Lpr{original.__name__}", (LatentPrototypeRouter, original), {})
    return _SWAP_CLASSES[original]


def original_type(module: nn.Module) -> type:
    """The family's router class of ``module`` (itself, or the class an installed LPR stands in for)."""
    if isinstance(module, LatentPrototypeRouter):
        return next(c for c in type(module).__mro__[1:] if not issubclass(c, LatentPrototypeRouter))
    return type(module)


def swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its dotted name in ``model`` (e.g. the original routers back in place)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def install_routers(model: nn.Module, routers: dict[str, LatentPrototypeRouter]) -> nn.Module:
    """Replace the router at each module name (e.g. ``model.layers.0.mlp.gate``) by its LPR, in place."""
    sites = {site.name: site for site in find_routers(model)}
    unknown = sorted(set(routers) - set(sites))
    if unknown:
        raise KeyError(f"no router at {unknown[:3]} in {type(model).__name__}")
    for name, router in routers.items():
        original = sites[name].module
        if isinstance(original, LatentPrototypeRouter):
            kept = original.__dict__.get(_ORIGINAL, {})
        else:
            kept = {key: value.detach() for key, value in original.state_dict().items()}
        router.__class__ = swap_class(original_type(original))
        router.__dict__[_ORIGINAL] = kept  # not a buffer: only the model-level state dict writes it
        parameter = next(original.parameters(), None)
        if parameter is not None:
            router.to(device=parameter.device)
        swap_modules(model, {name: router})
    _hook_state_dict(model)
    return model


def _installed(model: nn.Module) -> list[tuple[str, LatentPrototypeRouter]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, LatentPrototypeRouter) and _ORIGINAL in m.__dict__
    ]


def _hook_state_dict(model: nn.Module) -> None:
    """Once per model: state dicts keep the original routers' keys; the LPR's go under ``lpr.``."""
    if getattr(model, "_lpr_state_hooks", False):
        return

    def save_hook(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        for name, router in _installed(module):
            base = f"{prefix}{name}."
            for key in [k for k in state if k.startswith(base)]:
                state[base + LPR_PREFIX + key[len(base) :]] = state.pop(key)
            for key, value in router.__dict__[_ORIGINAL].items():
                state[base + key] = value

    def load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for name, router in _installed(module):
            base = f"{prefix}{name}."
            if not any(k.startswith(base + LPR_PREFIX) for k in state):
                continue  # a state dict without LPR tensors: let strict loading say what is missing
            for key in router.__dict__[_ORIGINAL]:
                state.pop(base + key, None)
            for key in [k for k in state if k.startswith(base + LPR_PREFIX)]:
                state[base + key[len(base + LPR_PREFIX) :]] = state.pop(key)

    model.register_state_dict_post_hook(save_hook)
    model.register_load_state_dict_pre_hook(load_hook)
    model._lpr_state_hooks = True


def block_of(model: nn.Module, site: RouterSite) -> nn.Module | None:
    """The MoE block that holds a router (it may hold the router's choice bias)."""
    parent, _, _ = site.name.rpartition(".")
    return model.get_submodule(parent) if parent else None


def identity_routers(model: nn.Module, spec: RouterSpec | None = None) -> dict[str, LatentPrototypeRouter]:
    """An identity-configured LPR for every router of ``model`` (gate weight, logit bias and choice
    bias copied from it), keyed by module name: installed, the model computes exactly what it did."""
    spec = spec or spec_for(model.config, latent_dim=model.config.hidden_size, similarity="dot")
    return _from_gates(model, lambda weight, **biases: identity_router(weight, spec, **biases))


def gate_routers(model: nn.Module) -> dict[str, LatentPrototypeRouter]:
    """Every router of ``model`` as a compact LPR equal to its gate (``pipeline.router.lpr.gate_router``: latent
    = experts, the gate's cost), keyed by module name: installed, the model computes exactly what it did."""
    spec = spec_for(model.config, latent_dim=1, similarity="dot")
    return _from_gates(model, lambda weight, **biases: gate_router(weight, spec, **biases))


def _from_gates(model: nn.Module, build: Callable[..., LatentPrototypeRouter]) -> dict[str, LatentPrototypeRouter]:
    """``build(weight (E, H) float32, logit_bias=, choice_bias=)`` for each router of the model, read by its family."""
    family = FAMILIES[family_of(model.config)]
    routers = {}
    for site in find_routers(model):
        original = site.module
        if isinstance(original, LatentPrototypeRouter):
            raise ValueError(f"{site.name} already holds an LPR router")
        weight, logit_bias, choice_bias = family.gate_tensors(original, block_of(model, site))
        router = build(weight.float(), logit_bias=logit_bias, choice_bias=choice_bias)
        routers[site.name] = router.to(dtype=torch.float32).eval()
    return routers
