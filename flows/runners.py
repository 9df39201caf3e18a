"""Where per-layer tasks run: a thread pool in the flow's process, or Dask (the ``dask`` extra)."""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pipeline.config import FlowConfig
from pipeline.errors import LprError


def task_runner(cfg: FlowConfig) -> TaskRunner:
    """``flow.task_runner``: ``threads`` (``max_workers`` layers at once) or ``dask`` — an existing
    scheduler at ``flow.dask_address``, else a LocalCluster of ``flow.dask_workers`` processes with
    one thread each (a layer task uses the worker's cores through torch/FAISS, not Dask threads)."""
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise LprError(
            "flow.task_runner=dask needs prefect-dask", "install the dask extra: pip install -e '.[dask]'"
        ) from None
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    cluster = {"n_workers": cfg.dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)
