"""The report's figures as PNG bytes (matplotlib, no display): load heatmaps, Gini per layer, the frontier.

Plots only draw; ``storage/report.py`` writes the bytes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.errors import LprError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LprError(
            "matplotlib is not installed (the report's plots need it)",
            'install the eval extra: pip install -e ".[eval]"',
        ) from None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def load_heatmaps(variants: dict[str, dict]) -> bytes:
    """One panel per variant: layers × experts, slot load as a multiple of a fair share (1 = even)."""
    plt = _pyplot()
    names = list(variants)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    image = None
    for ax, name in zip(axes[0], names, strict=True):
        load = np.array([layer["slot_load"] for layer in variants[name]["layers"]], dtype=float)  # (layers, E)
        share = load / load.mean(1, keepdims=True)
        image = ax.imshow(share, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{name}\nslot Gini {variants[name]['mean']['slot']['gini']:.3f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(load)))
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="load / fair share")
    fig.suptitle("Expert load per layer per variant (held-out top-k slots; 1 = fair share)", fontsize=10, y=1.06)
    return _png(fig)


def gini_per_layer(variants: dict[str, dict]) -> bytes:
    """Slot-load Gini of every MoE layer, one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, result in variants.items():
        ginis = [layer["slot"]["gini"] for layer in result["layers"]]
        ax.plot(range(len(ginis)), ginis, marker="o", label=name)
        ax.set_xticks(range(len(ginis)))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("Gini of expert load (top-k slots)")
    ax.set_ylim(bottom=0)
    ax.set_title("Gini of held-out expert load per layer (0 = perfectly even)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def frontier(curves: dict[str, list[dict]], points: dict[str, dict]) -> bytes:
    """Held-out cross-entropy against mean slot Gini: curves (each a list of {gini, cross_entropy,
    label}) and single points (variants). The y-axis stops at the upper quartile plus the spread below
    it, so that one far-off setting does not flatten the comparison; what lies above is marked ▲ at
    the top edge with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2)  # curves and points never share one
    every = [p["cross_entropy"] for curve in curves.values() for p in curve] + [
        p["cross_entropy"] for p in points.values()
    ]
    low, upper = min(every), float(np.percentile(every, 75))
    top = upper + max(upper - low, 1e-3)

    def mark(p: dict, label: str, color: str) -> None:
        y = min(p["cross_entropy"], top)
        text = label if p["cross_entropy"] <= top else f"{label} ({p['cross_entropy']:.2f}) ▲"
        if p["cross_entropy"] > top:
            ax.scatter([p["gini"]], [top], marker="^", color=color, zorder=3, clip_on=False)
        ax.annotate(text, (p["gini"], y), fontsize=7, xytext=(3, -9 if y == top else 3), textcoords="offset points")

    for name, curve in curves.items():
        color = next(colors)
        # in the order of the swept setting (a bias pushed past balance turns back)
        ax.plot([p["gini"] for p in curve], [p["cross_entropy"] for p in curve], marker="o", color=color, label=name)
        for p in curve:
            mark(p, p["label"], color)
    for name, p in points.items():
        color = next(colors)
        ax.scatter([p["gini"]], [min(p["cross_entropy"], top)], marker="*", s=120, zorder=3, color=color, label=name)
        if p["cross_entropy"] > top:
            mark(p, name, color)
    ax.set_ylim(low - 0.05 * (top - low), top)
    ax.set_xlabel("mean Gini of expert load over layers (held-out top-k slots)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("Quality/balance frontier (lower left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
