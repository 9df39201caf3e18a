"""Versions of the routers: the distill stage's ``routers/`` is version 0; each recalibration writes
the next one, and ``versions/current.json`` says which version is served.

::

    RUN_DIR/versions/
      v001/            layer_XXX.safetensors + layer_XXX.json (as routers/), version.json written last
      v001.partial/    while it is written: never read
      current.json     {"version": 1}: the published version (absent: version 0)
      traffic.json     the traffic files a scheduled recalibration has already taken

A version is complete exactly when its ``version.json`` exists; earlier versions are kept. Each
records the distill fingerprint it was made from, so a redone distillation makes it stale.
"""

from __future__ import annotations

import json
from typing import Any

from storage.errors import LprError
from storage.rundir import RunDir

VERSIONS = "versions"


def version_path(run: RunDir, number: int) -> str:
    """Where a version's layer files are: ``routers/`` for version 0."""
    return run.output_path("distill") if number == 0 else run.path(VERSIONS, f"v{number:03d}")


def partial_version_path(run: RunDir, number: int) -> str:
    return run.path(VERSIONS, f"v{number:03d}.partial")


def read_version(run: RunDir, number: int) -> dict[str, Any] | None:
    """A complete version's record (its ``version.json``), or None."""
    if number == 0:
        return None
    return run.read_json(f"{version_path(run, number)}/version.json")


def list_versions(run: RunDir) -> list[dict[str, Any]]:
    """Every complete recalibrated version's record, oldest first."""
    directory = run.path(VERSIONS)
    if not run.fs.exists(directory):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in run.fs.ls(directory, detail=False))
    numbers = [int(name[1:]) for name in names if name.startswith("v") and name[1:].isdigit()]
    return [record for number in numbers if (record := read_version(run, number)) is not None]


def next_version(run: RunDir) -> int:
    return max([0, *(record["version"] for record in list_versions(run))]) + 1


def commit_version(run: RunDir, number: int, record: dict[str, Any]) -> None:
    """Move a version's partial layer files into place, then write its ``version.json`` (last)."""
    partial, final = partial_version_path(run, number), version_path(run, number)
    if run.fs.exists(final):
        raise LprError(f"routers version {number} already exists in {run.url}", "rerun to write the next version")
    if run.is_local:
        run.fs.mv(partial, final, recursive=True)
    else:
        for key in run.fs.find(partial):
            run.fs.copy(key, final + key[len(partial) :])
        run.fs.rm(partial, recursive=True)
    run.write_text(f"{final}/version.json", json.dumps(record | {"version": number}, indent=2))


def current_version(run: RunDir) -> int:
    """The published version (0: the distill stage's routers)."""
    pointer = run.read_json(run.path(VERSIONS, "current.json")) or {}
    return int(pointer.get("version", 0))


def set_current(run: RunDir, number: int) -> None:
    run.fs.makedirs(run.path(VERSIONS), exist_ok=True)
    run.write_text(run.path(VERSIONS, "current.json"), json.dumps({"version": number}))


def seen_traffic(run: RunDir) -> dict[str, Any]:
    """Traffic files already taken by a scheduled recalibration: name → [size, modified time]."""
    return run.read_json(run.path(VERSIONS, "traffic.json")) or {}


def mark_traffic_seen(run: RunDir, files: dict[str, Any]) -> None:
    run.fs.makedirs(run.path(VERSIONS), exist_ok=True)
    run.write_text(run.path(VERSIONS, "traffic.json"), json.dumps(seen_traffic(run) | files, indent=2))


def served_version(run: RunDir) -> int:
    """The published routers version (``storage.versions``), if it was made from the current
    distillation; else 0, the distill stage's own routers."""
    number = current_version(run)
    if number == 0:
        return 0
    record, distill = read_version(run, number), run.read_manifest("distill")
    if record is None or distill is None or record.get("distill") != distill.fingerprint:
        return 0
    return number


def traffic_files(source: str, storage_options: dict[str, Any] | None = None) -> dict[str, list]:
    """The files of a traffic folder or bucket prefix (hidden ones aside): relative name → [size,
    modified], what tells a file that arrived since the last look."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if not fs.isdir(root):
        raise LprError(f"traffic {source} is not a folder", "point the recalibration at the folder samples arrive in")
    found = {}
    for path, entry in sorted(fs.find(root, detail=True).items()):
        name = path[len(root.rstrip("/")) + 1 :]
        if any(part.startswith(".") for part in name.split("/")):
            continue
        modified = entry.get("mtime") or entry.get("LastModified") or entry.get("last_modified") or ""
        found[name] = [int(entry.get("size") or 0), str(modified)]
    return found


def new_traffic(run: RunDir, source: str, storage_options: dict[str, Any] | None = None) -> dict[str, list]:
    """Traffic files not taken by an earlier recalibration (new names, or files that changed)."""
    seen = seen_traffic(run)
    return {name: stamp for name, stamp in traffic_files(source, storage_options).items() if seen.get(name) != stamp}
