"""Downstream tasks through the real lm-eval harness, on the in-memory model with its current routers.

Tasks are named in ``validate.tasks``: the tasks shipped in ``pipeline/lm_eval_tasks/`` (the local
``lpr_demo_cloze``, fully offline) and any task lm-eval knows (hellaswag, arc_easy, piqa, mmlu …,
which need their datasets on the machine). Needs the ``eval`` extra (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from pipeline.errors import LprError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


def require_lm_eval() -> None:
    """A one-line error, before any model work, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LprError(
            "lm-eval is not installed (validate.tasks names downstream tasks)",
            'install the eval extra (pip install -e ".[eval]"), or set validate.tasks to [] to skip downstream tasks',
        ) from None


def local_tasks() -> dict[str, dict[str, Any]]:
    """The shipped task configs by name, with their JSONL paths made absolute (lm-eval reads them as given)."""
    configs = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / name) for split, name in files.items()}
        configs[config["task"]] = config
    return configs


@functools.lru_cache(maxsize=2)
def _task_manager(defaults: bool) -> Any:
    """lm-eval's index of tasks, built once per process. With ``defaults`` it reads every built-in task
    YAML (20 s on 2 cores); the shipped tasks alone need only this package's directory."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=str(TASKS_DIR), include_defaults=defaults)


def _task_list(names: list[str], manager: Any) -> list[str | dict[str, Any]]:
    shipped = local_tasks()
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in shipped and name not in known]
    if unknown:
        raise LprError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}",
            f"set validate.tasks to shipped tasks ({', '.join(shipped)}) or lm-eval task names",
        )
    return [shipped.get(name, name) for name in names]


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache`` off while lm-eval scores the model (restored after).

    lm-eval's log-likelihood calls are a plain ``model(ids)``: with the config's default the model builds
    a KV cache it never reuses, and on transformers 5.25 a hybrid family's cache (Nemotron-H: a
    ``DynamicCache`` whose Mamba layers are ``DummyLayer``) breaks that forward outright.
    """
    config = model.config
    before = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, names: list[str], *, batch_size: int, limit: int | None, max_length: int
) -> dict[str, dict[str, float]]:
    """Run lm-eval on the model as it is now → {task: {"acc": …, "acc_stderr": …, "acc_norm": …, …}}."""
    if not names:
        return {}
    require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = _task_manager(defaults=not set(names) <= set(local_tasks()))
    tasks = _task_list(names, manager)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    try:
        with without_kv_cache(model):
            results = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,
                verbosity="ERROR",
            )
    except (ConnectionError, OSError) as err:
        raise LprError(
            f"lm-eval could not load the data of {names} ({str(err).splitlines()[0][:160]})",
            "standard tasks need their datasets on this machine; drop them from validate.tasks",
        ) from None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        figures = {}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
                figures[metric] = float(value)
        out[task] = figures | {"samples": int(results.get("n-samples", {}).get(task, {}).get("effective", 0))}
    return out
