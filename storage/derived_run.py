"""A run directory nested in another that shares the other's early stages (the frontier sweep, the native form).

``RUN_DIR/sweep/balance_0.25/`` distils with its own config into its own ``routers/`` and
manifests, but reads the parent's ``states.zarr`` and ``prototypes/`` (and their manifests) in
place: nothing large is copied, and the parent's outputs are never written or invalidated.
"""

from __future__ import annotations

import posixpath

from storage.rundir import STAGES, RunDir


class DerivedRun(RunDir):
    """``parent/<folder>/<name>``, with the outputs and manifests of ``shared`` stages read from ``parent``."""

    def __init__(self, parent: RunDir, folder: str, name: str, shared: tuple[str, ...]) -> None:
        parent.path(folder, name)  # the names must be safe inside the parent
        super().__init__(posixpath.join(parent.url.rstrip("/"), folder, name), parent.storage_options)
        self.parent = parent
        self.shared = shared
        if tuple(shared) != STAGES[: len(shared)]:
            raise ValueError(f"shared stages must be the first stages of {STAGES}, got {shared}")

    def output_path(self, stage: str) -> str:
        return self.parent.output_path(stage) if stage in self.shared else super().output_path(stage)

    def partial_path(self, stage: str) -> str:
        if stage in self.shared:
            raise ValueError(f"a derived run does not write the shared stage {stage}")
        return super().partial_path(stage)

    def manifest_path(self, stage: str) -> str:
        return self.parent.manifest_path(stage) if stage in self.shared else super().manifest_path(stage)

    def invalidate(self, stage: str) -> None:
        if stage in self.shared:
            raise ValueError(f"a derived run does not redo the shared stage {stage}")
        super().invalidate(stage)


def native_form_run(parent: RunDir) -> DerivedRun:
    """``RUN_DIR/forms/native/``: the routers distilled in the family's own form (``router.form: native``)
    beside a run whose own routers cannot be written into a checkpoint (a cosine LPR, a choice bias the
    family has no tensor for). It reads the parent's dump in place."""
    return DerivedRun(parent, "forms", "native", ("dump", "cluster"))
