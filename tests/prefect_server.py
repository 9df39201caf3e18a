"""A real Prefect server for the test session: ``prefect server start`` on 127.0.0.1 with its own
``PREFECT_HOME`` (SQLite database, results, logs), and the environment that points this process,
its subprocesses and Dask workers at it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (a runner's or worker's children too), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextmanager
def prefect_server(home: Path, timeout: float = 120) -> Iterator[dict]:
    """Start the server, wait for /api/health, set the environment; yields {url, seconds, env}."""
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # served runs start within a second of being triggered
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    }
    server_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": env["PREFECT_HOME"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        seconds = time.perf_counter() - started
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield {"url": env["PREFECT_API_URL"], "seconds": seconds, "env": env}
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        stop_group(proc)
        log.close()


async def wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout: float = 90):
    """The deployment ``FLOW/NAME`` once the serving process has created it (its log on failure)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    started = time.perf_counter()
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except ObjectNotFound:
                if proc.poll() is not None or time.perf_counter() - started > timeout:
                    raise AssertionError(f"no deployment {name}: {log.read_text()[-3000:]}") from None
                await asyncio.sleep(0.5)
