"""How far can any router of the model's own form get? The original gate, trained in the model like the LPR.

The reference the LPR's frontier should be read against: each MoE layer's own linear gate (as a
compact dot-product LPR, ``pipeline.router.install.gate_routers``, so it starts exactly at the original gate
and can represent anything ``original+bias`` can) trained by the distill stage's model-level phase,
with the same config, data, balance settings and final in-model bias calibration as the LPR — then
measured on the held-out documents like every variant. This is what ``router.init: gate`` distils,
at several balances with one model load. Where even the full gate cannot reach a balance at a cost,
no router trained this way will: the cost is the model's (its frozen experts), not the router's.
Ends with one JSON line.
Usage: ``python benchmarks/gate_bound.py RUN_DIR [--balance 0,0.5,0.75,1] [--steps N]`` (the run
needs its config only; default steps: ``distill.model_steps``).
"""

from __future__ import annotations

import argparse
import json

from pipeline.cli.runs import resolve_config
from pipeline.evaluation.heldout import heldout_sequences, measure
from pipeline.moe.loading import find_routers, load_model, resolve_model_path
from pipeline.router.calibrate import calibrate_in_model, training_sequences
from pipeline.router.install import gate_routers, install_routers, swap_modules
from pipeline.training.model_level import distill_in_model
from storage.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--balance", default="0,0.5,0.75,1", help="comma-separated distill.balance settings")
    parser.add_argument("--steps", type=int, default=None, help="model-level steps (default: distill.model_steps)")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg = resolve_config(run=run, config=None, sets=None)
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    held = heldout_sequences(cfg, tokenizer, cfg.validate.sequences)
    sequences = training_sequences(cfg, tokenizer)
    originals = {site.name: site.module for site in find_routers(model)}
    base = measure(model, held, cfg=cfg, teachers=originals)["cross_entropy"]
    rows: dict[str, dict] = {}

    def record(label: str, routers: dict) -> None:
        """Install ``routers``, calibrate their bias in the model, measure the held-out documents, restore."""
        install_routers(model, routers)
        calibrate_in_model(model, sequences.calibration, batch=cfg.distill.model_batch_sequences, quiet=True)
        result = measure(model, held, cfg=cfg, teachers=originals)
        swap_modules(model, originals)
        mean = result["mean"]
        rows[label] = {
            "gini": round(mean["slot"]["gini"], 5),
            "min_max": round(mean["slot"]["min_max"], 5),
            "delta_ce_pct": round((result["cross_entropy"] / base - 1) * 100, 3),
            "soft_gini": round(mean["soft"]["gini"], 5),
        }
        r = rows[label]
        figures = f"Gini {r['gini']:.4f}  min/max {r['min_max']:.3f}  ΔCE {r['delta_ce_pct']:+.2f} %"
        print(f"{label:<22} {figures}  soft Gini {r['soft_gini']:.4f}", flush=True)

    record("gate, untrained (bias)", gate_routers(model))  # the original gate + a calibrated bias
    for balance in (float(b) for b in args.balance.split(",")):
        update = {"balance": balance} | ({"model_steps": args.steps} if args.steps else {})
        routers = gate_routers(model)
        distill_in_model(
            model,
            routers,
            sequences.train,
            sequences.val,
            cfg.distill.model_copy(update=update),
            seed=cfg.seed,
            calibration=sequences.calibration,
        )
        record(f"gate trained, bal {balance:g}", routers)
    print(json.dumps({"tokens": int(held.ids.numel()), "steps": args.steps or cfg.distill.model_steps, **rows}))


if __name__ == "__main__":
    main()
