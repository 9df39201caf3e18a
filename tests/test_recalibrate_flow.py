"""The scheduled recalibration on a real Prefect server: `lpr-distill serve --recalibrate-from DIR`
serves the lpr-recalibrate deployment; each triggered run takes only the traffic files that are new,
recalibrates once per batch, skips when nothing is new, and publishes only a better version."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import to_yaml
from pipeline.data.documents import is_heldout
from pipeline.stages.distill import run_distill
from pipeline.testing.tiny_data import WORDS, make_texts
from storage.versions import list_versions, seen_traffic, served_version
from tests.conftest import clustered_run
from tests.prefect_server import stop_group, wait_for_deployment
from tests.test_recalibrate import DISTILL, RECALIBRATE

pytestmark = [pytest.mark.server, pytest.mark.slow]


def names(prefix: str, count: int, heldout: bool) -> list[str]:
    """File names that the document hash puts on the held-out side (or on the training side)."""
    found, i = [], 0
    while len(found) < count:
        name = f"{prefix}-{i:05d}"
        if is_heldout(name, 0.1) == heldout:
            found.append(name)
        i += 1
    return found


def write(folder: Path, files: list[str], texts: list[str]) -> None:
    for name, text in zip(files, texts, strict=True):
        (folder / name).write_text(text)


def skewed(count: int, seed: int) -> list[str]:
    """Documents from a third of the corpus's words: traffic of another mix than the corpus's."""
    rng = random.Random(seed)
    words = WORDS[: len(WORDS) // 3]
    return [" ".join(rng.choice(words) for _ in range(60)) + "\n" for _ in range(count)]


@pytest.fixture(scope="module")
def served(server, tmp_path_factory, tiny_model, tiny_corpus):
    work = tmp_path_factory.mktemp("recalibrate-flow")
    cfg, run = clustered_run(work / "run", tiny_model, tiny_corpus, distill=DISTILL, recalibrate=RECALIBRATE)
    run_distill(cfg=cfg, run=run)
    config = work / "run.yaml"
    config.write_text(to_yaml(cfg))
    traffic = work / "traffic"
    traffic.mkdir()
    env = os.environ | server["env"] | {"LPR_DISTILL_QUIET": "1"}
    cli = Path(sys.executable).parent / "lpr-distill"
    command = [str(cli), "serve", "--config", str(config), "--run-dir", str(work / "run"), "--name", "traffic"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*command, "--recalibrate-from", str(traffic), "--interval", "3600"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deployment = asyncio.run(wait_for_deployment("lpr-recalibrate/traffic", proc, work / "serve.log"))
        yield {"deployment": deployment, "run": run, "traffic": traffic, "log": work / "serve.log"}
    finally:
        stop_group(proc)
        log.close()


def _trigger(deployment, log: Path):
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment.id, poll_interval=1, timeout=600)
    assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, log.read_text()[-4000:])
    return flow_run


async def _artifact(key: str, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return found[0] if found else None


def test_scheduled_recalibration_takes_new_traffic_once_and_publishes_only_better(served):
    deployment, run, traffic, log = served["deployment"], served["run"], served["traffic"], served["log"]
    assert deployment.schedules and deployment.schedules[0].schedule.interval.total_seconds() == 3600
    assert deployment.parameters["traffic"] == str(traffic)

    # nothing has arrived: the run skips, no version
    _trigger(deployment, log)
    assert list_versions(run) == []

    # a batch whose training side is another mix than its held-out side (which is like the corpus the
    # served routers were calibrated on): recalibrating on it cannot make its own held-out traffic
    # more even, so the new version is kept and not published
    mixed = names("mixed", 120, heldout=False) + names("mixed", 24, heldout=True)
    write(traffic, mixed, skewed(120, seed=1) + make_texts(24, words_per_doc=60, seed=11))
    _trigger(deployment, log)
    (first,) = list_versions(run)
    assert not first["published"] and not first["better"], first["judgement"]
    assert served_version(run) == 0
    assert set(seen_traffic(run)) == set(mixed)

    # nothing new again: skipped, still one version
    _trigger(deployment, log)
    assert len(list_versions(run)) == 1

    # a batch of one mix throughout: recalibrated once on exactly these files, better, published
    skewed_names = names("skewed", 120, heldout=False) + names("skewed", 24, heldout=True)
    write(traffic, skewed_names, skewed(144, seed=2))
    flow_run = _trigger(deployment, log)
    versions = list_versions(run)
    assert len(versions) == 2
    second = versions[1]
    assert second["parent"] == 0 and second["published"] and second["better"], second["judgement"]
    assert second["after"]["gini"] < second["before"]["gini"]
    assert served_version(run) == 2
    assert set(seen_traffic(run)) == set(mixed) | set(skewed_names)
    artifact = asyncio.run(_artifact("lpr-recalibrate", flow_run.id))
    assert artifact is not None and "| mean |" in artifact.data and "**published**" in artifact.data
