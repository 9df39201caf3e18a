"""The frontier sweep: distil at several settings of the balance knob and put each on the
quality/balance plane (held-out cross-entropy against mean Gini of expert load), next to the bias
baseline swept over its strength and the other variants as points.

Each setting is distilled into ``RUN_DIR/sweep/balance_<b>/`` (its own routers and manifests,
the parent's states and prototypes read in place; a rerun skips settings already done), by the
stages that come after ``cluster`` and before ``validate`` — so a new distillation stage is swept
too. Results: ``RUN_DIR/sweep/frontier.json`` and ``frontier.png``; the validate stage's report
adds LPR's curve from there.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import RunConfig, to_yaml
from pipeline.errors import LprError
from pipeline.evaluation.heldout import heldout_sequences, measure
from pipeline.evaluation.plots import frontier, require_matplotlib
from pipeline.evaluation.report import curve_point, frontier_dominance
from pipeline.evaluation.variants import VariantSwitcher, check_fit
from pipeline.moe.loading import load_model, resolve_model_path
from pipeline.progress import info
from pipeline.router.install import install_routers
from pipeline.router.load import distilled_routers
from pipeline.stages.validate import bias_strength_curve
from storage.derived_run import DerivedRun
from storage.report import to_json, write_files
from storage.rundir import STAGES, RunDir

SHARED = ("dump", "cluster")
FOLDER = "sweep"


def sweep_stages() -> list[str]:
    """The registered stages between ``cluster`` and ``validate``: what one setting redoes."""
    from pipeline.stages.registry import STAGE_FUNCTIONS

    return [s for s in STAGE_FUNCTIONS if s not in SHARED and s != "validate" and s in STAGES]


def setting_run(run: RunDir, balance: float) -> DerivedRun:
    return DerivedRun(run, FOLDER, f"balance_{balance:g}", SHARED)


def distill_settings(cfg: RunConfig, run: RunDir, balances: list[float], *, force: bool) -> dict[float, DerivedRun]:
    """Distil at each balance setting into its own directory (skipped when already done with that config)."""
    from pipeline.stages.registry import STAGE_FUNCTIONS

    runs = {}
    for position, balance in enumerate(balances, start=1):
        sub = setting_run(run, balance)
        setting = cfg.model_copy(deep=True)
        setting.distill.balance = balance
        sub.ensure()
        sub.write_config(to_yaml(setting))
        info(f"[bold]sweep[/] balance {balance:g} ({position}/{len(balances)}) → {sub.url}")
        for stage in sweep_stages():
            STAGE_FUNCTIONS[stage](cfg=setting, run=sub, force=force)
        runs[balance] = sub
    return runs


def run_sweep(*, cfg: RunConfig, run: RunDir, balances: list[float], force: bool = False) -> dict[str, Any]:
    """Distil at every setting, measure every point on held-out documents, write ``sweep/``. Returns the results."""
    if not balances:
        raise LprError("no balance settings to sweep", "pass e.g. --balance 0,0.25,0.5,0.75,1")
    if not all(0 <= b <= 1 for b in balances):
        raise LprError(f"balance settings {balances} should lie in [0, 1]", "pass e.g. --balance 0,0.25,0.5,0.75,1")
    if not run.is_complete("cluster"):
        raise LprError(f"run directory {run.url} has no complete cluster stage", "run `lpr-distill cluster` first")
    require_matplotlib()
    started = time.time()
    runs = distill_settings(cfg, run, balances, force=force)
    model, tokenizer = load_model(cfg.model, resolve_model_path(cfg))
    held = heldout_sequences(cfg, tokenizer, cfg.validate.sequences)
    switcher = VariantSwitcher(model)
    lpr_curve = []
    for balance, sub in runs.items():
        switcher.restore()
        routers, _ = distilled_routers(sub)
        check_fit("lpr", model, routers)
        install_routers(model, routers)
        result = measure(model, held, cfg=cfg, teachers=switcher.originals)
        lpr_curve.append(curve_point(f"{balance:g}", result) | {"balance": balance, "run": sub.url})
        info(f"[bold]sweep[/] balance {balance:g}: CE {result['cross_entropy']:.4f}, Gini {lpr_curve[-1]['gini']:.3f}")
    points = {}
    for name in ("original", "lpr-init", "lpr"):
        if name == "lpr" and not run.is_complete("distill"):
            continue
        switcher.apply(name, cfg, run)
        points[name] = curve_point(name, measure(model, held, cfg=cfg, teachers=switcher.originals))
    built = switcher.apply("original+bias", cfg, run)
    bias_curve = bias_strength_curve(cfg, model, held, built.routers, switcher.originals)
    switcher.restore()
    results = {
        "balances": balances,
        "lpr": lpr_curve,
        "bias": bias_curve,
        "points": points,
        "heldout_tokens": int(held.ids.numel()),
        "dominance": frontier_dominance(lpr_curve, bias_curve, points["original"]["cross_entropy"]),
        "seconds": round(time.time() - started, 1),
    }
    curves = {"lpr (distill.balance)": lpr_curve, "original+bias (strength ×)": bias_curve}
    write_files(run, run.path(FOLDER), {"frontier.png": frontier(curves, points), "frontier.json": to_json(results)})
    info(f"[bold]sweep[/]: {results['dominance']['sentence']}")
    info(f"[bold]sweep[/]: {run.url_of(run.path(FOLDER))}/frontier.png")
    return results
