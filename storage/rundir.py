"""The run directory: its layout, stage manifests, and the commit protocol that makes stages atomic.

Layout (local path or fsspec URL)::

    RUN_DIR/
      config.yaml            resolved run configuration
      states.zarr/           dump        (written as states.zarr.partial/, resumable)
      prototypes/            cluster
      routers/               distill
      report/                validate
      lpr/                   export (or the directory its manifest names)
      manifests/<stage>.json written last: a stage is complete iff its manifest and output exist

A stage writes into ``<output>.partial``; ``commit`` removes the manifest's predecessor, renames
the partial output into place and writes the manifest last, so an interrupted stage never
leaves anything that ``status`` would call complete.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from typing import Any

import fsspec
from pydantic import BaseModel, Field

from storage.errors import LprError

STAGE_OUTPUTS = {
    "dump": "states.zarr",
    "cluster": "prototypes",
    "distill": "routers",
    "validate": "report",
    "export": "lpr",  # its manifest records the directory written (``--out`` may lie outside the run directory)
}
STAGES = tuple(STAGE_OUTPUTS)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def safe_name(name: str, what: str = "name") -> str:
    """``name`` if it is one plain path component (letters, digits, ``_ . -``; not ``.`` or ``..``).

    Every name that comes from data rather than from this code (a layer name read from a states
    store or a manifest, a stage's output name) goes through here before it becomes part of a
    path, so that no crafted store, manifest or URL can make a stage read or write outside the
    run directory: no ``/`` or ``\\``, no ``..``, no absolute path, no URL scheme.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise LprError(f"{what} {name!r} is not a safe name inside the run directory", "use letters, digits, _ . -")
    return name


class Manifest(BaseModel):
    """What a completed stage did: enough to decide whether a rerun can be skipped."""

    stage: str
    fingerprint: str  # hash of the config sections and input hashes the stage depends on
    config: dict[str, Any]
    inputs: dict[str, Any]  # hashes / identities of what the stage read
    package_version: str
    outputs: dict[str, Any]  # what it wrote (paths, row counts, sizes)
    stats: dict[str, Any] = {}
    started_at: str
    finished_at: str
    seconds: float
    skipped: bool = Field(False, exclude=True)  # set on the returned copy when a rerun was skipped


def fingerprint(config: dict[str, Any], inputs: dict[str, Any]) -> str:
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunDir:
    """A run directory at a local path or an fsspec URL (``s3://bucket/run``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        options = dict(storage_options or {})
        if "://" not in self.url or self.url.startswith("file://"):
            options.setdefault("auto_mkdir", True)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.storage_options = options
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # --- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path inside the run directory; names must be plain (no '/', '..') so nothing escapes it."""
        return posixpath.join(self.root, *(safe_name(part) for part in parts))

    def url_of(self, path: str) -> str:
        """The fsspec URL of a path returned by ``path`` (what zarr and other readers open)."""
        return self.fs.unstrip_protocol(path) if not self.is_local else path

    def output_path(self, stage: str) -> str:
        return self.path(STAGE_OUTPUTS[stage])

    def partial_path(self, stage: str) -> str:
        return self.path(STAGE_OUTPUTS[stage] + ".partial")

    def manifest_path(self, stage: str) -> str:
        return self.path("manifests", f"{stage}.json")

    # --- small files -----------------------------------------------------------------------
    def ensure(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.makedirs(self.path("manifests"), exist_ok=True)
        except PermissionError:
            raise LprError(f"run directory {self.url} is not writable", "choose a directory you can write to") from None

    def write_text(self, path: str, text: str) -> None:
        """Write a small file atomically (temp file + rename) so readers never see half of it."""
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"  # one per writer: concurrent dump shards never share it
        try:
            with self.fs.open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.fs.mv(tmp, path)
        except PermissionError:
            raise LprError(f"cannot write {path}", "check the run directory's permissions") from None
        except OSError as err:
            raise LprError(
                f"cannot write {path} ({err.strerror or err})", "free disk space or pick another run directory"
            ) from None

    def read_text(self, path: str) -> str | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r", encoding="utf-8") as handle:
            return handle.read()

    def read_json(self, path: str) -> Any:
        """A JSON file of the run directory, or None when it is missing or damaged."""
        text = self.read_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def write_config(self, text: str) -> None:
        self.write_text(self.path("config.yaml"), text)

    def read_config(self) -> str | None:
        return self.read_text(self.path("config.yaml"))

    # --- manifests and commit --------------------------------------------------------------
    def read_manifest(self, stage: str) -> Manifest | None:
        text = self.read_text(self.manifest_path(stage))
        if text is None:
            return None
        try:
            return Manifest.model_validate_json(text)
        except ValueError:
            return None  # a damaged manifest means "not complete"

    def is_complete(self, stage: str) -> bool:
        manifest = self.read_manifest(stage)
        return manifest is not None and self.output_exists(stage, manifest)

    def output_exists(self, stage: str, manifest: Manifest) -> bool:
        """Whether the output a manifest describes is there: its recorded local directory (an export
        with ``--out``), else the stage's place in the run directory."""
        directory = manifest.outputs.get("directory")
        if directory is not None:
            return fsspec.filesystem("file").exists(directory)
        return self.fs.exists(self.output_path(stage))

    def matching_manifest(self, stage: str, fp: str) -> Manifest | None:
        """The manifest of a complete earlier run of ``stage`` with the same fingerprint, if any."""
        manifest = self.read_manifest(stage)
        if manifest is not None and manifest.fingerprint == fp and self.fs.exists(self.output_path(stage)):
            return manifest
        return None

    def invalidate(self, stage: str) -> None:
        """Forget that ``stage`` (and every later stage) completed: remove their manifests first."""
        for later in STAGES[STAGES.index(stage) :]:
            if self.fs.exists(self.manifest_path(later)):
                self.fs.rm(self.manifest_path(later))

    def commit(self, stage: str, manifest: Manifest) -> None:
        """Move the stage's partial output into place, then write its manifest (last)."""
        final, partial = self.output_path(stage), self.partial_path(stage)
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        self._move_tree(partial, final)
        self.write_text(self.manifest_path(stage), manifest.model_dump_json(indent=2))

    def _move_tree(self, source: str, target: str) -> None:
        """A rename on local disk; on object stores (no directories, no rename) copy each object, then delete."""
        if self.is_local:
            self.fs.mv(source, target, recursive=True)
            return
        for key in self.fs.find(source):
            self.fs.copy(key, target + key[len(source) :])
        self.fs.rm(source, recursive=True)

    def output_bytes(self, stage: str, manifest: Manifest) -> int:
        directory = manifest.outputs.get("directory")
        if directory is not None:
            local = fsspec.filesystem("file")
            return int(local.du(directory, total=True)) if local.exists(directory) else 0
        return self.size_bytes(self.output_path(stage))

    def size_bytes(self, path: str) -> int:
        if not self.fs.exists(path):
            return 0
        return int(self.fs.du(path, total=True))
