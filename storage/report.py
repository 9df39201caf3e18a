"""Report files (``report/`` of the validate stage, ``sweep/`` of the frontier sweep): JSON, Markdown, PNG.

Each file is written under a temporary name and renamed; the stage that owns the directory
writes it as ``<dir>.partial`` and commits it, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
from typing import Any

from storage.errors import LprError
from storage.rundir import RunDir


def write_files(run: RunDir, directory: str, files: dict[str, str | bytes]) -> list[str]:
    """Write ``{name: text or bytes}`` into ``directory`` (created), each atomically. Returns the names."""
    run.fs.makedirs(directory, exist_ok=True)
    for name, content in files.items():
        path = f"{directory}/{name}"
        if isinstance(content, str):
            run.write_text(path, content)
            continue
        try:
            with run.fs.open(path + ".tmp", "wb") as handle:
                handle.write(content)
            run.fs.mv(path + ".tmp", path)
        except OSError as err:
            raise LprError(f"cannot write {path} ({err})", "check the run directory's space and permissions") from None
    return list(files)


def _finite(value: Any) -> Any:
    """NaN and ±inf (e.g. no temperature for a dot-product router) become null: strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(_finite(data), indent=2, allow_nan=False, default=float)


def read_report(run: RunDir) -> dict[str, Any] | None:
    """The validate stage's report.json, when the stage is complete."""
    if not run.is_complete("validate"):
        return None
    return run.read_json(f"{run.output_path('validate')}/report.json")
