"""Held-out quality and balance of each routing variant, side by side, on one run directory.

Variants, each swapped into the same loaded model: ``original`` gate; ``original+bias`` (the
original gate plus a choice-only per-expert bias calibrated, like the LPR's, on the run's stored
rows — the loss-free-balancing baseline); ``lpr-init`` (from the clusters, calibrated); ``lpr``
(distilled, when the run has a distill stage). Measured on held-out documents (never dumped,
clustered, distilled or calibrated on): cross-entropy, per-layer slot load (Gini, min/max) and
soft load (routing-weight mass per expert). Ends with one JSON line.
Usage: ``python benchmarks/heldout_routing.py RUN_DIR [--sequences 96]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch

from pipeline.cluster import sample_ranges
from pipeline.config import build_config, parse_yaml
from pipeline.corpus import iter_documents, iter_packed, split_documents
from pipeline.export import build_init_routers, distilled_routers
from pipeline.init_routers import calibrate_bias, encode_rows
from pipeline.metrics import gini, min_max_ratio
from pipeline.models import find_routers, load_model, resolve_model_path
from pipeline.replace import install_routers
from pipeline.router import LatentPrototypeRouter, identity_router, spec_for
from storage.rundir import RunDir
from storage.states import StatesReader


def heldout_batches(cfg, tokenizer, sequences: int) -> torch.Tensor:
    docs = split_documents(iter_documents(cfg.corpus), split="heldout", heldout_fraction=cfg.corpus.heldout_fraction)
    packed = iter_packed(docs, tokenizer=tokenizer, seq_len=cfg.corpus.seq_len, max_tokens=None)
    full = [s.ids for s in packed if len(s.ids) == cfg.corpus.seq_len]
    return torch.tensor(np.stack(full[:sequences]))


def measure(model, ids: torch.Tensor) -> dict:
    """Held-out CE and per-layer slot / soft load of the model's routers as they are."""
    sites = find_routers(model)
    experts = sites[0].module.num_experts
    slots = {site.name: np.zeros(experts) for site in sites}
    soft = {site.name: np.zeros(experts) for site in sites}

    def hook(name: str) -> Callable:
        def record(module, args, output) -> None:
            _, weights, indices = output
            idx, w = indices.numpy().reshape(-1), weights.float().numpy().reshape(-1)
            slots[name] += np.bincount(idx, minlength=experts)
            soft[name] += np.bincount(idx, weights=w, minlength=experts)

        return record

    handles = [site.module.register_forward_hook(hook(site.name)) for site in sites]
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            batch = ids[start : start + 16]
            losses.append(float(model(batch, labels=batch).loss) * len(batch))
    for handle in handles:
        handle.remove()
    per_layer = [
        {"gini": gini(slots[n]), "min_max": min_max_ratio(slots[n]), "soft_gini": gini(soft[n])} for n in slots
    ]
    return {
        "cross_entropy": sum(losses) / len(ids),
        "gini": float(np.mean([p["gini"] for p in per_layer])),
        "min_max": float(np.mean([p["min_max"] for p in per_layer])),
        "soft_gini": float(np.mean([p["soft_gini"] for p in per_layer])),
        "layers": per_layer,
    }


def original_with_bias(model, cfg, run: RunDir) -> dict[str, LatentPrototypeRouter]:
    """The original gates as identity LPRs, with a choice bias calibrated on the run's stored rows."""
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    spec = spec_for(model.config, latent_dim=model.config.hidden_size, similarity="dot")
    ranges = sample_ranges(reader.num_rows, reader.chunk_rows, cfg.router.calibration_rows, cfg.seed + 1000)
    routers = {}
    for site, layer in zip(find_routers(model), reader.layers, strict=True):
        router = identity_router(site.module.weight, spec)
        calibrate_bias(router, encode_rows(router, reader, layer, ranges))
        routers[site.name] = router.eval()
    return routers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--sequences", type=int, default=96)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg = build_config(parse_yaml(run.read_config() or "", origin="config.yaml"))
    path = resolve_model_path(cfg)
    model, tokenizer = load_model(cfg.model, path)
    ids = heldout_batches(cfg, tokenizer, args.sequences)
    results = {"original": measure(model, ids)}
    variants = {
        "original+bias": lambda m: original_with_bias(m, cfg, run),
        "lpr-init": lambda m: build_init_routers(cfg, run)[0],
    }
    if run.is_complete("distill"):
        variants["lpr"] = lambda m: distilled_routers(run)[0]
    for name, make in variants.items():
        fresh, _ = load_model(cfg.model, path)
        results[name] = measure(install_routers(fresh, make(fresh)), ids)
    base = results["original"]["cross_entropy"]
    print(f"{'variant':<15} {'CE':>7} {'ΔCE':>8} {'slot Gini':>10} {'min/max':>8} {'soft Gini':>10}")
    for name, r in results.items():
        delta = (r["cross_entropy"] / base - 1) * 100
        figures = f"{r['gini']:10.4f} {r['min_max']:8.3f} {r['soft_gini']:10.4f}"
        print(f"{name:<15} {r['cross_entropy']:7.4f} {delta:+7.2f}% {figures}")
    summary = {
        name: {key: round(value, 5) for key, value in r.items() if key != "layers"} for name, r in results.items()
    }
    print(json.dumps({"tokens": int(ids.numel()), **summary}))


if __name__ == "__main__":
    main()
