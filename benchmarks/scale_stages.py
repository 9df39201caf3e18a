"""One stage of ``benchmarks/scale.py`` in its own process, so that each stage's peak memory is its own.

``run_stage`` starts ``python benchmarks/scale_stages.py STAGE RUN_DIR OUT.json``; the child reports its
peak RSS as ``VmHWM`` from ``/proc/self/status`` when it is done: the high-water mark of its own
address space since ``exec``. (Not ``ru_maxrss``, neither the child's own nor ``RUSAGE_CHILDREN``:
Linux carries the parent's resident set at ``fork`` over into the child's ``ru_maxrss``.)
The child calls the project's stage functions exactly as the CLI and the flows do (``run_dump``,
``cluster_layer`` / ``run_cluster``, ``distill_one`` per layer then ``run_distill``, ``run_validate``,
``run_export`` then ``load_lpr_model``) with timers around a few of the functions they call (model loading, PCA,
k-means, training, calibration, held-out passes), which the extrapolation scales separately.

Stages: ``dump``, ``cluster``, ``distill-gate`` (the per-layer, gate-level phase), ``distill-model``
(model-level distillation and the in-model calibration), ``validate``, ``export``, and
``cluster-sample`` (one layer clustered at the default sample: ``cluster_layer`` on a store filled
by ``fill_store``, the child stage ``fill``); ``build`` makes the checkpoint, in a child too.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("dump", "cluster", "distill-gate", "distill-model", "validate", "export")


class Timers:
    """Seconds and calls accumulated per key by functions wrapped in place (``wrap``). A call made inside
    another timed call counts under its own key and also under ``outer>key``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active: list[str] = []

    def wrap(self, owner: Any, attr: str, key: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            keys = [key] + [f"{outer}>{key}" for outer in self.active[-1:]]
            self.active.append(key)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.active.pop()
                for name in keys:
                    self.seconds[name] += time.perf_counter() - started
                    self.calls[name] += 1

        setattr(owner, attr, timed)

    def wrap_everywhere(self, owner: Any, attr: str, key: str) -> None:
        """``wrap`` the function ``owner.attr`` in its module and wherever a loaded module imported it by name."""
        original = getattr(owner, attr)
        self.wrap(owner, attr, key)
        for module in list(sys.modules.values()):
            if module is not owner and getattr(module, attr, None) is original:
                setattr(module, attr, getattr(owner, attr))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {key: {"seconds": round(s, 3), "calls": self.calls[key]} for key, s in self.seconds.items()}


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_stage(stage: str, run_dir: Path, *, log: Path) -> dict[str, Any]:
    """Run ``stage`` in a child process. Returns its wall seconds, peak RSS (MiB, the child's ``VmHWM``),
    bytes the run directory grew by, and what the child reported."""
    out = run_dir / f"bench-{stage}.json"
    before = dir_bytes(run_dir)
    started = time.perf_counter()
    with log.open("a") as sink:
        code = subprocess.call([sys.executable, __file__, stage, str(run_dir), str(out)], stdout=sink, stderr=sink)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"stage {stage} failed (exit {code}); see {log}")
    report = json.loads(out.read_text())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": report.pop("peak_rss_mib"),
        "bytes": dir_bytes(run_dir) - before,
    } | report


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def peak_rss_mib() -> float:
    """This process's peak resident set since exec (``VmHWM``), MiB."""
    return round(_status_kib("VmHWM") / 1024, 1)


class AnonymousPeak:
    """The largest ``RssAnon`` seen, sampled every 0.2 s in a thread: the part of the resident set that is
    the process's own. The rest of VmHWM can be the checkpoint's file pages mapped while the model loads,
    which the kernel drops under memory pressure (Mixtral, 2 layers: 12 GB anonymous + 7 GB file)."""

    def __init__(self) -> None:
        self.kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.kib = max(self.kib, _status_kib("RssAnon"))

    def stop_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(max(self.kib, _status_kib("RssAnon")) / 1024, 1)


def fill_store(source_url: str, target_url: str, *, rows: int, seed: int) -> dict[str, Any]:
    """A one-layer states store of ``rows`` rows: every dumped row of the first MoE layer, then dumped
    rows again (drawn at random) with Gaussian noise of 0.1 × each dimension's standard deviation on
    ``x`` and every other field (the teacher's routing) copied. For measuring the cluster stage at its
    default sample when the benchmark dumped fewer tokens."""
    import torch

    from storage.states import StatesReader, StatesWriter, StoreLayout

    reader = StatesReader(source_url)
    layout = reader.layout()
    one = StoreLayout(
        layer_modules=[layout.layer_modules[0]],
        layer_indices=[layout.layer_indices[0]],
        hidden_size=layout.hidden_size,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        x_dtype="float16",
        chunk_rows=layout.chunk_rows,
        codec=layout.codec,
    )
    writer = StatesWriter.create(target_url, layout=one, attrs=reader.own_attrs(), fingerprint="scale-fill")
    layer, target = reader.layers[0], one.layer_names[0]
    names = {"token_id": None, "doc_id": None, "position": None, "logits": layer, "topk_idx": layer, "topk_w": layer}
    stored = {name: reader.read(name, layer=where) for name, where in names.items()}  # (N, …): N is small
    x_all = reader.read_x(layer).float()  # (N, H)
    std = x_all.std(0, keepdim=True)
    rng = np.random.default_rng(seed)
    written = 0
    while written < rows:
        n = min(reader.chunk_rows, rows - written)
        if written < reader.num_rows:
            picks = np.arange(written, min(written + n, reader.num_rows))
        else:
            picks = np.sort(rng.choice(reader.num_rows, size=n, replace=n > reader.num_rows))
        x = x_all[picks]
        if written >= reader.num_rows:
            x = x + 0.1 * std * torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
        values = {(f"{target}/{name}" if where else name): stored[name][picks] for name, where in names.items()}
        values[f"{target}/x"] = x.to(torch.float16).numpy()
        writer.append_rows(values, 1)
        written += len(picks)
    writer.finish({})
    return {"rows": written, "source_rows": reader.num_rows}


def _child(stage: str, run_dir: Path, out: Path) -> None:
    """The child process: one stage of the run in ``run_dir`` (its config is ``run_dir/config.yaml``)."""
    if stage == "build":  # a checkpoint (not a stage of the pipeline): in a child, so the parent stays small
        import torch
        from scale_geometries import GEOMETRIES, build_checkpoint
        from transformers import PreTrainedTokenizerFast

        spec = json.loads((run_dir / "build.json").read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
        geometry, dtype = GEOMETRIES[spec["geometry"]], getattr(torch, spec["dtype"])
        count = build_checkpoint(geometry, layers=spec["layers"], tokenizer=tokenizer, path=run_dir, dtype=dtype)
        out.write_text(json.dumps({"parameters": count, "peak_rss_mib": peak_rss_mib()}))
        return
    import pipeline.clustering.kmeans as kmeans
    import pipeline.clustering.pca as pca
    import pipeline.evaluation.heldout as heldout
    import pipeline.moe.loading as loading
    import pipeline.router.calibrate as calibrate
    import pipeline.router.from_clusters as from_clusters
    import pipeline.stages.cluster as cluster
    import pipeline.stages.distill as distill
    import pipeline.stages.dump as dump
    import pipeline.stages.validate as validate
    import pipeline.training.gate_level as gate_level
    import pipeline.training.model_level as model_level
    from pipeline.config import build_config, read_yaml
    from storage.rundir import RunDir
    from storage.states import StatesReader

    anonymous = AnonymousPeak()
    cfg = build_config(read_yaml(run_dir / "config.yaml"))
    run = RunDir(str(run_dir))
    timers = Timers()
    for owner, attr, key in (
        (loading, "load_model", "load"),
        (pca, "fit_basis", "pca"),
        (kmeans, "balanced_kmeans", "kmeans"),
        (from_clusters, "initial_router", "init"),
        (from_clusters, "calibrate_bias", "bias"),
        (from_clusters, "build_init_routers", "lpr-init"),
        (gate_level, "distill_layer", "train"),
        (model_level, "distill_in_model", "train"),
        (calibrate, "calibrate_in_model", "calibrate"),
        (heldout, "measure", "heldout"),
        (pca.LatentBasis, "project", "project"),
        (StatesReader, "read_x", "read"),
    ):
        timers.wrap_everywhere(owner, attr, key)
    report: dict[str, Any] = {}
    if stage == "dump":
        manifest = dump.run_dump(cfg=cfg, run=run)
        report["loop_seconds"] = manifest.stats["loop_seconds"]
        report["rows"] = manifest.outputs["rows"]
    elif stage == "fill":
        spec = json.loads((run_dir / "fill.json").read_text())
        report = fill_store(spec["source"], run.url_of(run.output_path("dump")), rows=spec["rows"], seed=spec["seed"])
    elif stage == "cluster":
        manifest = cluster.run_cluster(cfg=cfg, run=run)
        report["layers"] = manifest.stats["layers"]
    elif stage == "cluster-sample":  # the filled store has no dump manifest: the per-layer function, as a flow's
        meta = cluster.cluster_layer(cfg=cfg, run=run, layer="layer_000", fp="scale-sample")  # task calls it
        report["layers"] = {"layer_000": cluster.layer_summary(meta)}
        report["kmeans"] = {k: meta["kmeans"][k] for k in _KMEANS_KEYS}
    elif stage == "distill-gate":
        _, _, fp = distill.distill_identity(cfg, run)
        reader = StatesReader(run.url_of(run.output_path("dump")))
        model_config = loading.load_config(cfg.model, loading.resolve_model_path(cfg))
        report["layers"] = {
            layer: distill.distill_one(cfg=cfg, run=run, reader=reader, layer=layer, fp=fp, model_config=model_config)
            for layer in reader.layers
        }
    elif stage == "distill-model":
        manifest = distill.run_distill(cfg=cfg, run=run)
        report["model_level"] = {k: v for k, v in manifest.stats["model_level"].items() if k != "history"}
    elif stage == "validate":
        manifest = validate.run_validate(cfg=cfg, run=run)
        report["summary"] = manifest.stats["summary"]
    elif stage == "export":
        from pipeline.router.load import load_lpr_model
        from pipeline.stages.export import run_export

        path = run_export(cfg=cfg, run=run, out=run_dir / "export")
        started = time.perf_counter()
        load_lpr_model(loading.resolve_model_path(cfg), path)
        timers.seconds["load"] += time.perf_counter() - started
        timers.calls["load"] += 1
    else:
        raise SystemExit(f"unknown stage {stage}")
    cpu = os.times()  # user + system seconds of this process (all its threads): steadier than wall time on a
    report |= {"timers": timers.as_dict(), "peak_rss_mib": peak_rss_mib(), "cpu_seconds": round(cpu[0] + cpu[1], 2)}
    report["peak_anonymous_mib"] = anonymous.stop_mib()
    out.write_text(json.dumps(report, default=float))  # shared machine


_KMEANS_KEYS = ("seconds", "distance_seconds", "auction_seconds", "update_seconds", "size_min", "size_max", "phases")


if __name__ == "__main__":
    _child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
