"""The native form beside an LPR run: validate's ``native`` variant needs routers in the family's own
tensors; when the run's own routers do not fold into them (a cosine LPR, a choice bias the family
has no tensor for), they are distilled with ``router.form: native`` into ``RUN_DIR/forms/native/``
(``storage.derived_run.native_form_run``): the run's config otherwise, its dump read in place, redone
only when that config or the dump changes. ``export --checkpoint`` then ships them."""

from __future__ import annotations

from pipeline.config import RunConfig, to_yaml
from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.loading import load_config, resolve_model_path
from pipeline.progress import info
from pipeline.router.load import distilled_routers
from pipeline.router.shipped import fold_problem
from pipeline.stages.distill import run_distill
from storage.derived_run import native_form_run
from storage.rundir import RunDir


def native_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the routers distilled in the family's own form (which starts from the gates)."""
    router = cfg.router.model_copy(update={"form": "native", "init": "gate"})
    return cfg.model_copy(update={"router": router})


def ensure_native_form(cfg: RunConfig, run: RunDir) -> RunDir:
    """The run whose distilled routers a drop-in checkpoint carries: ``run`` itself when its routers fold,
    else its ``forms/native`` run, distilled first when it is missing or stale."""
    family = FAMILIES[family_of(load_config(cfg.model, resolve_model_path(cfg)))]
    if fold_problem(distilled_routers(run)[0], family) is None:
        return run
    native = native_form_run(run)
    setting = native_config(cfg)
    native.ensure()
    native.write_config(to_yaml(setting))
    manifest = run_distill(cfg=setting, run=native)
    if not manifest.skipped:
        info(f"[bold]validate[/]: the routers in {family.name}'s own form distilled into {native.url}")
    return native
