"""The stages whose work is per MoE layer, split into plan → one call per layer → commit.

A flow fans the per-layer calls out; ``commit`` is the stage's own ``run_<stage>`` (the function the
CLI calls), which finds every layer already done with the same fingerprint, reuses it, and writes
the manifest — so a fanned-out run leaves exactly the files and manifest the CLI leaves. No Prefect
here: these are plain functions over ``pipeline/`` and ``storage/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.moe.loading import load_config, resolve_model_path
from pipeline.stages import cluster, distill
from pipeline.stages.protocol import previous_run
from storage.layer_files import read_layer_meta
from storage.rundir import RunDir
from storage.states import StatesReader

Identity = Callable[[RunConfig, RunDir], tuple[dict[str, Any], dict[str, Any], str]]
LayerWork = Callable[[RunConfig, RunDir, str, str, bool], dict[str, Any]]


@dataclass(frozen=True)
class LayerStage:
    """How to fan one stage out: its identity (config, inputs, fingerprint) and its per-layer work."""

    identity: Identity
    run_layer: LayerWork  # (cfg, run, layer, fingerprint, force) -> {"layer", "reused", "summary"}
    check: Callable[[RunConfig, StatesReader], Any] = lambda cfg, reader: None  # config errors before fan-out


@dataclass(frozen=True)
class LayerPlan:
    """What a stage has to do: nothing (its manifest matches) or every layer of the store."""

    skip: bool
    fingerprint: str = ""
    layers: tuple[str, ...] = ()


def plan_stage(stage: str, cfg: RunConfig, run: RunDir, *, force: bool) -> LayerPlan:
    """Skip when the stage's manifest matches (as the CLI does); otherwise the layers to fan out.

    When the stage must run, ``previous_run`` forgets it and every later stage first, so nothing
    downstream looks complete while its inputs are redone.
    """
    spec = LAYER_STAGES[stage]
    _, _, fp = spec.identity(cfg, run)
    if previous_run(run, stage, fp, force=force) is not None:
        return LayerPlan(skip=True, fingerprint=fp)
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    spec.check(cfg, reader)  # one error from the plan, not the same error from every layer task
    return LayerPlan(skip=False, fingerprint=fp, layers=tuple(reader.layers))


def _matches(run: RunDir, directory: str, layer: str, fp: str) -> dict[str, Any] | None:
    meta = read_layer_meta(run, directory, layer)
    return meta if meta is not None and meta.get("fingerprint") == fp else None


def cluster_one(cfg: RunConfig, run: RunDir, layer: str, fp: str, force: bool) -> dict[str, Any]:
    """One layer's prototypes into ``prototypes.partial/`` unless ``run_cluster`` would reuse them
    (done in this attempt, or in the last complete run, with the same fingerprint; ``force`` redoes)."""
    if not force:
        for where in (run.partial_path(cluster.STAGE), run.output_path(cluster.STAGE)):
            if (meta := _matches(run, where, layer, fp)) is not None:
                return {"layer": layer, "reused": True, "summary": cluster.layer_summary(meta)}
    meta = cluster.cluster_layer(cfg=cfg, run=run, layer=layer, fp=fp)
    return {"layer": layer, "reused": False, "summary": cluster.layer_summary(meta)}


def _distill_identity(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Any], dict[str, Any], str]:
    return distill.distill_identity(cfg, run)


def distill_one(cfg: RunConfig, run: RunDir, layer: str, fp: str, force: bool) -> dict[str, Any]:
    """One layer's gate-level router, unless ``run_distill`` would reuse one already there (as in the CLI,
    a layer finished in an interrupted attempt is kept even with ``force``: it was made with this config)."""
    if (summary := distill.finished_layer(cfg, run, layer, fp)) is not None:
        return {"layer": layer, "reused": True, "summary": summary}
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    model_config = load_config(cfg.model, resolve_model_path(cfg))
    summary = distill.distill_one(cfg=cfg, run=run, reader=reader, layer=layer, fp=fp, model_config=model_config)
    return {"layer": layer, "reused": False, "summary": summary}


LAYER_STAGES: dict[str, LayerStage] = {
    "cluster": LayerStage(identity=cluster.cluster_identity, run_layer=cluster_one, check=cluster.check_cluster_inputs),
    "distill": LayerStage(identity=_distill_identity, run_layer=distill_one),
}
