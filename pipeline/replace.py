"""Put LPR routers in place of a model's routers so that the model runs unchanged around them.

The replacement is an instance of a class derived from both ``LatentPrototypeRouter`` and the
family's own router class, so ``isinstance`` checks still match: transformers' router-logit
recorder (``output_router_logits=True``) keeps capturing, and the aux-loss path keeps working.
"""

from __future__ import annotations

from torch import nn

from pipeline.models import find_routers
from pipeline.router import LatentPrototypeRouter

_SWAP_CLASSES: dict[type, type] = {}


def swap_class(original: type) -> type:
    """LatentPrototypeRouter's behaviour under the family router's type (one class per family)."""
    if original not in _SWAP_CLASSES:
        _SWAP_CLASSES[original] = type(f"Lpr{original.__name__}", (LatentPrototypeRouter, original), {})
    return _SWAP_CLASSES[original]


def install_routers(model: nn.Module, routers: dict[str, LatentPrototypeRouter]) -> nn.Module:
    """Replace the router at each module name (e.g. ``model.layers.0.mlp.gate``) by its LPR, in place."""
    sites = {site.name: site for site in find_routers(model)}
    for name, router in routers.items():
        original = sites[name].module
        if isinstance(original, LatentPrototypeRouter):
            original_type = next(c for c in type(original).__mro__[2:] if c is not LatentPrototypeRouter)
        else:
            original_type = type(original)
        router.__class__ = swap_class(original_type)
        parameter = next(original.parameters(), None)
        if parameter is not None:
            router.to(device=parameter.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, router)
    return model
