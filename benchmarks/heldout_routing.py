"""Held-out quality and balance of each routing variant, side by side, on one run directory.

A thin caller of the validate stage's pieces (``pipeline/variants.py``, ``pipeline/heldout.py``),
without lm-eval or the report: ``original`` gate; ``original+bias`` (the original gate plus a
choice-only per-expert bias calibrated in the model on training-side sequences, like the LPR's
final calibration — the loss-free-balancing baseline); ``lpr-init`` (from the clusters,
calibrated); ``lpr`` (distilled, when the run has a distill stage). Measured on held-out documents
(never dumped, clustered, distilled or calibrated on): cross-entropy, per-layer slot load (Gini,
min/max) and soft load (routing-weight mass).
Ends with one JSON line.
Usage: ``python benchmarks/heldout_routing.py RUN_DIR [--sequences N]`` (default: ``validate.sequences``,
1024: every held-out sequence of the demo).
"""

from __future__ import annotations

import argparse
import json

from pipeline.cli.runs import resolve_config
from pipeline.evaluation.heldout import heldout_sequences, measure
from pipeline.evaluation.report import interval_text
from pipeline.evaluation.variants import VariantSwitcher
from pipeline.moe.loading import load_model, resolve_model_path
from storage.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--sequences", type=int, default=None)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg = resolve_config(run=run, config=None, sets=None)  # the run's config.yaml, as the CLI reads it
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    held = heldout_sequences(cfg, tokenizer, args.sequences or cfg.validate.sequences)
    switcher = VariantSwitcher(model)
    names = ["original", "original+bias", "lpr-init"] + (["lpr"] if run.is_complete("distill") else [])
    results = {}
    for name in names:
        switcher.apply(name, cfg, run)
        results[name] = measure(model, held, cfg=cfg, teachers=switcher.originals)
    base = results["original"]["cross_entropy"]
    header = f"{'variant':<15} {'CE':>7} {'ΔCE':>8} {'slot Gini':>10} {'90 % docs':>13} {'floor':>6}"
    print(f"{header} {'min/max':>8} {'soft Gini':>10} {'agree':>6}")
    summary = {}
    for name, r in results.items():
        mean = r["mean"]
        summary[name] = {
            "cross_entropy": round(r["cross_entropy"], 5),
            "gini": round(mean["slot"]["gini"], 5),
            "gini_documents_90": [round(v, 5) for v in mean["slot"]["document_interval"]["gini"]],
            "gini_floor": round(mean["slot"]["document_interval"]["noise_gini"], 5),
            "min_max": round(mean["slot"]["min_max"], 5),
            "soft_gini": round(mean["soft"]["gini"], 5),
            "topk_agreement": round(mean["topk_agreement"], 5),
        }
        delta = (r["cross_entropy"] / base - 1) * 100
        interval = interval_text(mean["slot"]["document_interval"]["gini"])
        floor = mean["slot"]["document_interval"]["noise_gini"]
        figures = f"{mean['slot']['gini']:10.4f} {interval:>13} {floor:6.3f} {mean['slot']['min_max']:8.3f}"
        figures += f" {mean['soft']['gini']:10.4f}"
        print(f"{name:<15} {r['cross_entropy']:7.4f} {delta:+7.2f}% {figures} {mean['topk_agreement']:6.3f}")
    print(json.dumps({"tokens": int(held.ids.numel()), **summary}))


if __name__ == "__main__":
    main()
