"""The cluster stage: per MoE layer, a PCA latent basis and exactly balanced k-means → ``prototypes/``.

Per layer (``cluster_layer``, a function of the config and the layer so that a flow can fan it
out): sample whole chunks of rows from the states store, fit the basis on the first
``pca_rows`` of them, project all sampled rows, cluster them into one cluster per expert (each
token in ``assign_k`` clusters, every cluster the same number of slots), match clusters to
experts on the teacher's routing, and write the layer's files. ``run_cluster`` checks the inputs,
runs every layer (reusing layers already done with the same fingerprint) and commits the stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.clustering.kmeans import balanced_kmeans
from pipeline.clustering.matching import match_clusters
from pipeline.clustering.pca import fit_basis
from pipeline.clustering.sampling import sample_ranges
from pipeline.config import RunConfig
from pipeline.errors import LprError
from pipeline.progress import info, progress_bar
from pipeline.stages.protocol import build_manifest, check_states_model, previous_run
from storage.layer_files import copy_layer, read_layer_meta
from storage.prototypes import write_layer
from storage.rundir import Manifest, RunDir, fingerprint
from storage.states import StatesReader

STAGE = "cluster"


def _blocks(ranges: list[tuple[int, int]], block_rows: int, limit: int | None = None) -> Iterator[tuple[int, int]]:
    """Split ranges into reads of at most block_rows rows, stopping after ``limit`` rows."""
    left = limit if limit is not None else sum(stop - start for start, stop in ranges)
    for start, stop in ranges:
        for begin in range(start, stop, block_rows):
            end = min(begin + block_rows, stop, begin + left)
            yield begin, end
            left -= end - begin
            if left <= 0:
                return


def resolve_layers(reader: StatesReader, names: list[str] | None) -> list[str]:
    """Store layer names from user input: "layer_002" or "2"."""
    if not names:
        return list(reader.layers)
    resolved = []
    for name in names:
        candidate = f"layer_{int(name):03d}" if name.strip().isdigit() else name.strip()
        if candidate not in reader.layers:
            raise LprError(
                f"layer '{name}' is not in the states store (it has {', '.join(reader.layers)})",
                "pass --layers with names from `lpr-distill status RUN_DIR`",
            )
        resolved.append(candidate)
    return resolved


def check_cluster_inputs(cfg: RunConfig, reader: StatesReader) -> tuple[int, int]:
    """Every problem with the config against this store, before any work. Returns (latent_dim, assign_k)."""
    experts, top_k = int(reader.attrs["num_experts"]), int(reader.attrs["top_k"])
    hidden = int(reader.attrs["hidden_size"])
    assign_k = cfg.cluster.assign_k or top_k
    latent_dim = cfg.cluster.latent_dim or min(64, hidden)
    if latent_dim > hidden:
        raise LprError(
            f"cluster.latent_dim={cfg.cluster.latent_dim} should be ≤ the hidden size {hidden}",
            f"set --set cluster.latent_dim={min(64, hidden)}",
        )
    if assign_k >= experts:
        raise LprError(
            f"cluster.assign_k={assign_k} should be < the number of experts {experts}", "choose a smaller assign_k"
        )
    if reader.num_rows < experts:
        raise LprError(
            f"the states store has {reader.num_rows} rows, fewer than the {experts} experts to cluster into",
            "dump more tokens (dump.max_tokens)",
        )
    return latent_dim, assign_k


def cluster_layer(*, cfg: RunConfig, run: RunDir, layer: str, fp: str) -> dict[str, Any]:
    """Cluster one layer into ``prototypes.partial/``; returns its metadata (also written as JSON)."""
    started = time.time()
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    latent_dim, assign_k = check_cluster_inputs(cfg, reader)
    experts = int(reader.attrs["num_experts"])
    c = cfg.cluster
    layer_index = int(reader.group[layer].attrs["layer_index"])
    seed = cfg.seed + layer_index
    ranges = sample_ranges(reader.num_rows, reader.chunk_rows, c.sample_rows, seed)
    pca_blocks = (reader.read_x(layer, a, b) for a, b in _blocks(ranges, c.block_rows, c.pca_rows))
    basis = fit_basis(pca_blocks, latent_dim)
    z = np.concatenate([basis.project(reader.read_x(layer, a, b)) for a, b in _blocks(ranges, c.block_rows)])
    teacher = np.concatenate([reader.read("topk_idx", a, b, layer=layer) for a, b in ranges])
    fit_rows = c.fit_rows_per_expert * experts if c.fit_rows_per_expert else None
    with progress_bar(f"cluster {layer}", c.iterations) as bar:
        result, kmeans_stats = balanced_kmeans(
            z,
            experts,
            top_k=assign_k,
            niter=c.iterations,
            seed=seed,
            tol=c.tol,
            fit_rows=fit_rows,
            on_iteration=lambda _: bar.advance(1),
        )
    expert_of_cluster, match_stats = match_clusters(result.assignment, teacher, experts)
    tensors = {
        "mean": basis.mean,
        "components": basis.components,
        "explained_variance": basis.explained_variance,
        "centroids": result.centroids,
        "prices": result.prices,
        "expert_of_cluster": expert_of_cluster,
        "cluster_of_expert": np.argsort(expert_of_cluster),
    }
    meta = {
        "layer": layer,
        "layer_index": layer_index,
        "module": reader.layer_module(layer),
        "fingerprint": fp,
        "num_experts": experts,
        "assign_k": assign_k,
        "latent_dim": latent_dim,
        "rows": int(z.shape[0]),
        "pca_rows": min(c.pca_rows, int(z.shape[0])),
        "variance_kept": basis.variance_kept,
        "kmeans": kmeans_stats,
        "matching": match_stats,
        "seconds": round(time.time() - started, 3),
    }
    write_layer(run, run.partial_path(STAGE), layer, tensors, meta)
    return meta


def cluster_identity(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(config, inputs, fingerprint) of a cluster run over this run's dump: what the manifest and every
    layer file carry, so a flow that fans layers out passes ``cluster_layer`` the same fingerprint."""
    dump = run.read_manifest("dump")
    if dump is None or not run.is_complete("dump"):
        raise LprError(f"no complete states store in {run.url}", "run `lpr-distill dump RUN_DIR` first")
    check_states_model(cfg, run)
    config = {"seed": cfg.seed, **cfg.section("cluster")}
    inputs = {"states": dump.fingerprint}
    return config, inputs, fingerprint(config, inputs)


def run_cluster(*, cfg: RunConfig, run: RunDir, force: bool = False, layers: list[str] | None = None) -> Manifest:
    """Write ``prototypes/`` for every MoE layer. ``layers``: redo these (the rest is reused when up to
    date); ``force`` without ``layers`` redoes every layer."""
    config, inputs, fp = cluster_identity(cfg, run)
    started = time.time()
    reader = StatesReader(run.url_of(run.output_path("dump")), run.storage_options)
    check_cluster_inputs(cfg, reader)
    redo = set(resolve_layers(reader, layers)) if force or layers else set()
    if (done := previous_run(run, STAGE, fp, force=bool(redo))) is not None:
        return done.model_copy(update={"skipped": True})

    partial, final = run.partial_path(STAGE), run.output_path(STAGE)
    metas: dict[str, dict[str, Any]] = {}
    for layer in reader.layers:
        meta = read_layer_meta(run, partial, layer)
        if layer not in redo and meta is not None and meta.get("fingerprint") == fp:
            info(f"[bold]cluster[/] {layer}: reused (already done with this config)")
        elif layer not in redo and (old := read_layer_meta(run, final, layer)) and old.get("fingerprint") == fp:
            copy_layer(run, final, partial, layer)
            meta = old
            info(f"[bold]cluster[/] {layer}: reused from the last complete run")
        else:
            meta = cluster_layer(cfg=cfg, run=run, layer=layer, fp=fp)
        metas[layer] = meta
    summary = {layer: layer_summary(meta) for layer, meta in metas.items()}
    outputs = {"prototypes": "prototypes", "layers": list(metas), "bytes": run.size_bytes(partial)}
    manifest = build_manifest(
        stage=STAGE, config=config, inputs=inputs, outputs=outputs, stats={"layers": summary}, started=started
    )
    run.commit(STAGE, manifest)
    info(f"[bold]cluster[/]: {len(metas)} layers → {run.url_of(final)}")
    return manifest


def layer_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The figures a person reads per layer (the status and CLI tables, the manifest)."""
    kmeans = meta["kmeans"]
    return {
        "rows": meta["rows"],
        "latent_dim": meta["latent_dim"],
        "variance_kept": round(meta["variance_kept"], 4),
        "assign_k": meta["assign_k"],
        "size_min": kmeans["size_min"],
        "size_max": kmeans["size_max"],
        "mse": round(kmeans["inertia"][-1], 6),
        "matched_share": round(meta["matching"]["matched_share"], 4),
        "chance_share": round(meta["matching"]["chance_share"], 4),
        "seconds": meta["seconds"],
    }
