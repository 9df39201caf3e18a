"""What the command line does around the stages: resolve the config (defaults < file < --set <
flags), keep RUN_DIR/config.yaml in step with a command that succeeds, run stages in order, and
print the validation summary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.config import RunConfig, apply_overrides, build_config, parse_override, parse_yaml, read_yaml, to_yaml
from pipeline.errors import LprError
from pipeline.stages.registry import STAGE_FUNCTIONS
from storage.rundir import RunDir

out = Console()


def print_table(table: Table, width: int = 140) -> None:
    """Print at least ``width`` columns wide: a log or a pipe (80 columns by default) keeps the table
    whole instead of truncating its cells to "layer…" in every row."""
    Console(width=max(out.width, width)).print(table)


def resolve_config(
    *,
    run: RunDir | None,
    config: Path | None,
    sets: list[str] | None,
    flags: dict[str, Any] | None = None,
    presets: dict[str, Any] | None = None,
) -> RunConfig:
    """defaults < a command's presets < config file (or the run's config.yaml) < --set < named flags."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if config is not None:
        data, origin = read_yaml(config), str(config)
    elif run is not None and (text := run.read_config()) is not None:
        origin = run.path("config.yaml")
        data = parse_yaml(text, origin=origin)
    overrides = [(key.split("."), value) for key, value in (presets or {}).items() if not _holds(data, key)]
    overrides += [parse_override(s) for s in sets or []]
    overrides += [(key.split("."), value) for key, value in (flags or {}).items() if value is not None]
    return build_config(apply_overrides(data, overrides), origin=origin)


def _holds(data: dict[str, Any], dotted: str) -> bool:
    """Whether the nested mapping ``data`` sets ``dotted`` (e.g. "validate.variants")."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


@contextmanager
def _saving_config(run: RunDir, cfg: RunConfig) -> Iterator[None]:
    """Save the resolved config as RUN_DIR/config.yaml for the command; if the command fails, put the
    previous one back, so a rejected command (wrong model, bad value) does not become the run's config,
    and remove the run directory again if this command created it and nothing was written into it."""
    existed = run.fs.exists(run.root)
    run.ensure()
    previous = run.read_config()
    run.write_config(to_yaml(cfg))
    try:
        yield
    except Exception:
        with suppress(LprError, OSError):  # the cleanup must not hide the error the user needs to see
            if previous is not None:
                run.write_config(previous)
            elif run.fs.exists(run.path("config.yaml")):
                run.fs.rm(run.path("config.yaml"))
            if not existed and not run.fs.find(run.root):  # only the empty folders that ensure() made
                run.fs.rm(run.root, recursive=True)
        raise


def _run_stages(stages: list[str], *, run: RunDir, cfg: RunConfig, force: bool) -> None:
    with _saving_config(run, cfg):
        for stage in stages:
            manifest = STAGE_FUNCTIONS[stage](cfg=cfg, run=run, force=force)
            if not manifest.skipped:
                out.print(f"[green]✓[/] {stage} finished in {manifest.seconds:.1f} s")


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def print_report(run: RunDir) -> None:
    """The report's summary table and path (after validate, and at the end of the demo)."""
    from pipeline.evaluation.report import interval_text
    from storage.report import read_report

    report = read_report(run)
    if report is None:
        return
    rows = report["summary"]
    table = Table(title="validation (held-out, means over layers)", box=box.SIMPLE_HEAD)
    tasks = [key for key in rows[0] if key.startswith("task:")]
    columns = ["variant", "Gini", "90 % docs", "floor", "min/max", "CV", "CE", "Δ CE", "ppl", "agree"]
    for column in columns + [f"{t.removeprefix('task:')} acc" for t in tasks]:
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        floor = row.get("gini_floor")
        cells = [row["variant"], f"{row['gini']:.3f}", interval_text(row.get("gini_documents"))]
        cells += ["—" if floor is None else f"{floor:.3f}"]
        cells += [f"{row['min_max']:.2f}", f"{row['cv']:.3f}"]
        cells += [f"{row['cross_entropy']:.4f}", f"{row['delta_ce_pct']:+.2f} %", f"{row['perplexity']:.1f}"]
        cells += [f"{row['topk_agreement']:.1%}"]
        cells += ["—" if row[t] is None else f"{row[t]:.3f}" for t in tasks]
        table.add_row(*cells)
    print_table(table)
    out.print(report["winner"]["sentence"].replace("**", ""), highlight=False)
    if report.get("frontier"):
        out.print(f"frontier: {report['frontier']['sentence']}", highlight=False)
    out.print(f"report: {run.url_of(run.output_path('validate'))}/report.md", highlight=False)
