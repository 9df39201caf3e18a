"""Balance per traffic slice: the held-out documents of each slice measured apart, per variant.

A router balanced on the calibration mix is not balanced on every mix: routing follows the
document, and experts specialise. Each slice is a corpus source (for the demo: one kind of its
documents) whose held-out side — split by the same document hash as the corpus, so never
calibrated on — is measured like the main held-out set, with its own document noise floor. A slice
whose floor is above ``validate.slice_max_floor`` is too small to show a router's imbalance; the
report says so instead of giving its figures.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.evaluation.heldout import HeldOut, heldout_sequences, measure

DEMO_SLICES = {"topics": "demo:topic", "docstrings": "demo:doc", "code": "demo:code"}


def slice_sources(cfg: RunConfig) -> dict[str, str]:
    """Slice name → corpus source: ``validate.slices``, or for the demo corpus its document kinds."""
    if cfg.validate.slices:
        return dict(cfg.validate.slices)
    return dict(DEMO_SLICES) if cfg.corpus.source == "demo" else {}


def slice_heldouts(cfg: RunConfig, tokenizer: Any) -> dict[str, HeldOut | None]:
    """Each slice's held-out sequences (at most ``validate.slice_sequences``), read once for every
    variant; None for a slice whose held-out documents give no full sequence (too small to say)."""
    held: dict[str, HeldOut | None] = {}
    for name, source in slice_sources(cfg).items():
        corpus = cfg.corpus.model_copy(update={"source": source, "format": "auto", "include": None})
        try:
            held[name] = heldout_sequences(cfg, tokenizer, cfg.validate.slice_sequences, corpus=corpus)
        except LprError as err:
            if "give no sequence" not in err.message:  # a missing or unreadable source is the user's to fix
                raise LprError(f"validate.slices '{name}': {err.message}", err.hint) from None
            held[name] = None
    return held


def slice_figures(result: dict[str, Any], max_floor: float) -> dict[str, Any]:
    """The figures a reader compares per slice: slot Gini with its document floor and interval,
    min/max, cross-entropy."""
    slot = result["mean"]["slot"]
    interval = slot["document_interval"]
    figures = {
        "documents": interval["documents"],
        "tokens": result["tokens"],
        "floor": interval["noise_gini"],
        "too_small": interval["noise_gini"] > max_floor,
        "gini": slot["gini"],
        "gini_documents": interval["gini"],
        "min_max": slot["min_max"],
        "cross_entropy": result["cross_entropy"],
    }
    return figures


EMPTY = {"documents": 0, "tokens": 0, "floor": None, "too_small": True}  # a slice with no full held-out sequence


def measure_slices(
    model: nn.Module, slices: dict[str, HeldOut | None], *, cfg: RunConfig, teachers: dict
) -> dict[str, dict]:
    """Slice name → figures for the routing the model has now."""
    return {
        name: dict(EMPTY)
        if held is None
        else slice_figures(measure(model, held, cfg=cfg, teachers=teachers), cfg.validate.slice_max_floor)
        for name, held in slices.items()
    }


def slices_report(cfg: RunConfig, measured: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """report.json's ``slices``: the sources, the figures per variant and slice (Δ CE against the
    original gate on the same slice), and each variant's worst slice."""
    base = measured.get("original", {})
    for figures in measured.values():
        for name, f in figures.items():
            known = "cross_entropy" in f and "cross_entropy" in base.get(name, {})
            f["delta_ce_pct"] = (f["cross_entropy"] / base[name]["cross_entropy"] - 1) * 100 if known else None
    return {
        "sources": slice_sources(cfg),
        "max_floor": cfg.validate.slice_max_floor,
        "variants": measured,
        "worst": {variant: worst_slice(figures) for variant, figures in measured.items()},
    }


def worst_slice(figures: dict[str, dict[str, Any]]) -> str | None:
    """The slice furthest above its own noise floor (slices too small to say anything aside)."""
    telling = {name: f for name, f in figures.items() if not f["too_small"]}
    return max(telling, key=lambda n: telling[n]["gini"] - telling[n]["floor"]) if telling else None


def slices_markdown(slices: dict[str, Any]) -> list[str]:
    """report.md's slice section: one row per slice and variant, and the worst slice per variant."""
    by_variant: dict[str, dict[str, dict]] = slices["variants"]
    if not by_variant:
        return []
    lines = [
        "## Balance per traffic slice",
        "",
        "Each slice's held-out documents measured apart (the headline holds for the calibration mix; "
        "a stream of one kind can be less even). Floor = the Gini a router balanced over such documents "
        "would still show on these; Δ CE against the original gate on the same slice.",
        "",
        "| slice | variant | documents | tokens | Gini | floor | min/max | CE | Δ CE % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, figures in by_variant.items():
        for name, f in figures.items():
            if f["too_small"]:
                why = "no full sequence" if f["floor"] is None else f"floor {f['floor']:.3f} > {slices['max_floor']:g}"
                cells = f"too few documents to say ({why}) | | | |"
                lines.append(f"| {name} | {variant} | {f['documents']} | {f['tokens']:,} | {cells} |")
                continue
            lines.append(
                f"| {name} | {variant} | {f['documents']} | {f['tokens']:,} | {f['gini']:.3f} | {f['floor']:.3f} | "
                f"{f['min_max']:.2f} | {f['cross_entropy']:.4f} | {_pct(f['delta_ce_pct'])} |"
            )
    lines.append("")
    for variant, name in slices["worst"].items():
        if name is None:
            lines.append(f"Worst slice for {variant}: none of the slices has enough documents to say.")
            continue
        f = by_variant[variant][name]
        lines.append(
            f"Worst slice for {variant}: **{name}** (Gini {f['gini']:.3f} against its floor {f['floor']:.3f}, "
            f"min/max {f['min_max']:.2f}, Δ CE {_pct(f['delta_ce_pct'])} %)."
        )
    return [*lines, ""]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"
