"""Deployments of the ``lpr_distill`` flow — or, given a traffic folder, of the ``lpr_recalibrate``
flow — served from this process, or in a process work pool.

Parameters of a deployment are the run: the resolved config (every section), the run directory
(made absolute when local: runs start in another working directory), and ``force`` (or the
traffic folder). The entrypoint is a module path (``flows.lpr_flow.lpr_distill``,
``flows.recalibrate_flow.lpr_recalibrate``), so whatever runs the flow (this process's runner, a
process worker) imports the installed package rather than a file path.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound

from flows.lpr_flow import lpr_distill
from flows.recalibrate_flow import lpr_recalibrate
from pipeline.config import RunConfig
from pipeline.errors import LprError

DEFAULT_NAME = "lpr-distill"


def check_api_url() -> str:
    """Deployments live on a server: without PREFECT_API_URL they would go to a throwaway one."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise LprError(
            "PREFECT_API_URL is not set, so there is no server to hold the deployment",
            "start one (`prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api",
        )
    return url


def _absolute(run_dir: str) -> str:
    return str(Path(run_dir).expanduser().resolve()) if "://" not in run_dir else run_dir


def run_parameters(cfg: RunConfig, run_dir: str, *, force: bool = False, traffic: str | None = None) -> dict[str, Any]:
    """The flow parameters of one run; local paths become absolute. With ``traffic``: the
    recalibration flow's (no ``force``: each run takes only what is new)."""
    parameters: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "run_dir": _absolute(run_dir)}
    return parameters | ({"traffic": _absolute(traffic)} if traffic else {"force": force})


def _flow(traffic: str | None):
    return lpr_recalibrate if traffic else lpr_distill


def schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    if cron and interval:
        raise LprError("both --cron and --interval given", "choose one schedule")
    return {"cron": cron} if cron else ({"interval": interval} if interval else {})


def serve(
    cfg: RunConfig,
    run_dir: str,
    *,
    name: str = DEFAULT_NAME,
    cron: str | None = None,
    interval: float | None = None,
    force: bool = False,
    traffic: str | None = None,
) -> None:
    """Create or update the deployment ``lpr-distill/NAME`` (``lpr-recalibrate/NAME`` with ``traffic``)
    and run its scheduled and triggered runs in this process until stopped (its schedule stays
    active when this process stops)."""
    check_api_url()
    _flow(traffic).serve(
        name=name,
        parameters=run_parameters(cfg, run_dir, force=force, traffic=traffic),
        pause_on_shutdown=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
        **schedule(cron, interval),
    )


def deploy(
    cfg: RunConfig,
    run_dir: str,
    *,
    name: str = DEFAULT_NAME,
    pool: str = DEFAULT_NAME,
    cron: str | None = None,
    interval: float | None = None,
    force: bool = False,
    traffic: str | None = None,
) -> str:
    """Create or update the deployment ``lpr-distill/NAME`` (``lpr-recalibrate/NAME`` with ``traffic``)
    in the process work pool ``pool`` (created if missing); a worker (``prefect worker start --pool
    POOL``) runs it. Returns the deployment id."""
    check_api_url()
    asyncio.run(_ensure_process_pool(pool))
    deployment = _flow(traffic).to_deployment(
        name,
        parameters=run_parameters(cfg, run_dir, force=force, traffic=traffic),
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        **schedule(cron, interval),
    )
    return str(deployment.apply())


async def _ensure_process_pool(pool: str) -> None:
    async with get_client() as client:
        try:
            found = await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return
        if found.type != "process":
            raise LprError(f"work pool '{pool}' is a '{found.type}' pool", "pass --pool with a process work pool")
