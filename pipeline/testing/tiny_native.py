"""Native distils (``router.form: native``) of tiny models of every family, shipped as drop-in checkpoints
and checked the way a user would load them.

``check_native_checkpoints`` runs, per family, dump → cluster → distill with ``router.form: native`` on a
tiny model with random gates (``perturb_gates``), exports the distilled routers with ``export_checkpoint``,
then loads every checkpoint with stock ``from_pretrained`` in **one fresh interpreter that cannot import
this project** (``tiny_checkpoints.check_in_fresh_process``) and compares its routers' outputs with the
in-memory native routers and the original gates. Shared by ``tests/test_native_families.py`` and
``scripts/compat_matrix.py`` (its "native distil" column); ``tests/test_native.py`` uses ``native_run``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.testing.tiny_checkpoints import check_in_fresh_process, stock_case
from pipeline.testing.tiny_families import FAST_RUN, perturb_gates, tiny_model

# FAST_RUN's settings, the family's own tensors only, three in-model steps
NATIVE: dict[str, dict[str, Any]] = {
    "router": FAST_RUN["router"] | {"form": "native"},
    "distill": FAST_RUN["distill"] | {"model_steps": 3},
}
ROUTING_MOVED = 1e-4  # the least max |Δ logits| against the original gate that counts as a different routing


def native_run(root: Path, family: str, tokenizer, corpus: Path, **sections: dict) -> tuple[Any, Any, Any]:
    """A tiny model of ``family`` (gates perturbed: spread logits) saved at root/source, then dump, cluster and
    a native distil (the distil requires the cluster stage, whose prototypes it does not use); returns
    (cfg, run, model)."""
    from pipeline.config import build_config, to_yaml
    from pipeline.stages.cluster import run_cluster
    from pipeline.stages.distill import run_distill
    from pipeline.stages.dump import run_dump
    from storage.rundir import RunDir

    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    perturb_gates(model, family)
    model.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    data = {"model": {"path": str(root / "source")}, "corpus": {"source": str(corpus), "seq_len": 32}}
    cfg = build_config(data | FAST_RUN | NATIVE | sections)
    run = RunDir(str(root / "run"))
    run.ensure()
    run.write_config(to_yaml(cfg))
    for stage in (run_dump, run_cluster, run_distill):
        stage(cfg=cfg, run=run)
    return cfg, run, model


def check_native_checkpoints(families: list[str], root: Path, tokenizer, corpus: Path) -> dict[str, dict[str, Any]]:
    """Native-distil, export and check a drop-in checkpoint of each family (one fresh interpreter for all of
    them); per family the comparison (``tiny_checkpoints._compare``) with ``distil_seconds``, or
    ``{"error": one line}`` where a step failed."""
    from pipeline.router.load import distilled_routers
    from pipeline.stages.export_checkpoint import export_checkpoint

    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    items, contexts, seconds = [], {}, {}
    for family in families:
        here = root / family
        here.mkdir(parents=True, exist_ok=True)
        began = time.time()
        try:
            _, run, model = native_run(here, family, tokenizer, corpus)
            routers, _ = distilled_routers(run)
            written = export_checkpoint(routers, here / "source", here / "checkpoint")
            item, contexts[family] = stock_case(family, model, routers, here, written)
            items.append(item)
        except Exception as err:  # the matrix says what failed; the tests assert on it
            results[family] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        seconds[family] = round(time.time() - began, 2)
    results |= check_in_fresh_process(items, contexts, root)
    batch = round(time.time() - started, 1)
    return {
        family: results[family] | {"distil_seconds": seconds[family], "batch_seconds": batch} for family in families
    }


def routing_moved(result: dict[str, Any]) -> bool:
    """Every router routes differently from the original gate: logits moved by more than ``ROUTING_MOVED``,
    or the top-k of some token changed."""
    return result["original_logits_min_diff"] > ROUTING_MOVED or result["original_indices_changed_share"] > 0


def native_passes(result: dict[str, Any], bar: float = 1e-5) -> bool:
    """What ``tests/test_native_families.py`` asserts, as one verdict (the compat matrix's column)."""
    return (
        "error" not in result
        and result["logits_max_abs_diff"] <= bar
        and result["indices_equal"]
        and routing_moved(result)
        and not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"])
        and result["stock_modules"] == ["transformers"]
        and result["project_modules_imported"] == []
        and result["differing_outside_routers"] == []
        and result["differing_tensors"] is not None
        and 1 <= result["differing_tensors"] <= result["router_tensors"]
    )
