"""Deployments of the ``lpr_distill`` flow: served from this process, or in a process work pool.

Parameters of a deployment are the run: the resolved config (every section), the run directory
(made absolute when local: runs start in another working directory), and ``force``. The
entrypoint is the module path ``flows.lpr_flow.lpr_distill``, so whatever runs the flow (this
process's runner, a process worker) imports the installed package rather than a file path.
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


def run_parameters(cfg: RunConfig, run_dir: str, *, force: bool = False) -> dict[str, Any]:
    """The flow parameters of one run; a local run directory becomes an absolute path."""
    if "://" not in run_dir:
        run_dir = str(Path(run_dir).expanduser().resolve())
    return {"config": cfg.model_dump(mode="json"), "run_dir": run_dir, "force": force}


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
) -> None:
    """Create or update the deployment ``lpr-distill/NAME`` and run its scheduled and triggered runs
    in this process until stopped (its schedule stays active when this process stops)."""
    check_api_url()
    lpr_distill.serve(
        name=name,
        parameters=run_parameters(cfg, run_dir, force=force),
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
) -> str:
    """Create or update the deployment ``lpr-distill/NAME`` in the process work pool ``pool`` (created
    if missing); a worker (``prefect worker start --pool POOL``) runs it. Returns the deployment id."""
    check_api_url()
    asyncio.run(_ensure_process_pool(pool))
    deployment = lpr_distill.to_deployment(
        name,
        parameters=run_parameters(cfg, run_dir, force=force),
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
