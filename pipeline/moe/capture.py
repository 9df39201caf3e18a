"""What a model's routers see and decide: forward hooks on every router, and one reading of a
router's output whatever its family returns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import LprError
from pipeline.moe.families import _supported
from pipeline.moe.loading import RouterSite


class RouterCapture:
    """Forward hooks on every router; ``take(mask)`` returns what the last forward pass routed.

    Each record: x (T, H), logits (T, E), topk_w (T, k), topk_idx (T, k), still on the model's
    device, restricted to the non-padding rows of the flattened batch.
    """

    def __init__(self, sites: list[RouterSite], x_dtype: torch.dtype) -> None:
        self.sites = sites
        self.x_dtype = x_dtype  # x is cast to its storage dtype at once, on the model's device: half the bytes to keep
        self._records: list[tuple[torch.Tensor, ...] | None] = [None] * len(sites)
        self._handles = [site.module.register_forward_hook(self._hook(i)) for i, site in enumerate(sites)]

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            # x is the first positional argument (some blocks pass a choice bias as the second);
            # Llama 4's (dense scores, logits) becomes the common (logits, weights, indices)
            self._records[index] = (args[0], *as_triple(output, int(getattr(module, "top_k", 0))))

        return record

    def take(self, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        rows = None if bool(mask.all()) else mask.nonzero().squeeze(1)  # no copy when nothing is padding
        for site, record in zip(self.sites, self._records, strict=True):
            if record is None:
                raise LprError(f"router {site.name} was not called in the forward pass", "this model is not supported")
            x, logits, weights, indices = (t.reshape(-1, t.shape[-1]).detach() for t in record)
            if rows is not None:
                keep = rows.to(x.device)
                x, logits, weights, indices = (t.index_select(0, keep) for t in (x, logits, weights, indices))
            out.append({"x": x.to(self.x_dtype), "logits": logits, "topk_w": weights, "topk_idx": indices})
        self._records = [None] * len(self.sites)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def as_triple(output: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's output as (logits [T, E], weights [T, k], indices [T, k]), whatever its family returns.

    Llama 4 returns (dense scores [T, E], logits [T, E]): the chosen experts are the top-k logits and
    their weights are the scores there.
    """
    if isinstance(output, tuple) and len(output) == 3:
        return output
    if isinstance(output, tuple) and len(output) == 2:
        scores, logits = output
        indices = logits.reshape(-1, logits.shape[-1]).topk(top_k, dim=-1).indices
        return logits, scores.reshape(-1, scores.shape[-1]).gather(-1, indices), indices
    raise LprError(
        f"a router returned {type(output).__name__}, not (logits, weights, indices)",
        f"this MoE family's router does not follow the transformers 5 contract (supported: {_supported()})",
    )
