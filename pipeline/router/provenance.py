"""What distilled routers started from, read from their per-layer distill summaries (light: no torch,
so ``status`` can say it)."""

from __future__ import annotations

from typing import Any

FROM_GATES = {"init": "gate"}  # a layer's distill summary when distillation started from its gate (router.init: gate)


def distilled_from(summaries: dict[str, dict[str, Any]]) -> str:
    """What distilled routers started from, by their per-layer distill summaries: "gate" or "clusters"."""
    return "gate" if any(summary.get("init") == FROM_GATES["init"] for summary in summaries.values()) else "clusters"
