"""Routers as a drop-in checkpoint ships them, back in the model for validation.

``shipped_routers``: routers folded into the family's tensors (``pipeline.router.native``) and rounded
to the dtype each tensor has in the source checkpoint — what ``export --checkpoint`` writes.
``checkpoint_routers``: the router tensors of an exported checkpoint directory, read from its
safetensors files under the keys stock ``from_pretrained`` loads them from (``checkpoint_keys``).
Either way they come back as gate-form LPRs (``gate_router``), which route exactly as the family's
router with those tensors, so validate measures them in the run's loaded model like any variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pipeline.errors import LprError
from pipeline.moe.checkpoint_keys import checkpoint_keys, empty_model
from pipeline.moe.families import FAMILIES, family_of
from pipeline.moe.family import Family
from pipeline.moe.loading import find_routers
from pipeline.router.load import distilled_routers
from pipeline.router.lpr import LatentPrototypeRouter, gate_router, spec_for
from pipeline.router.native import FamilyRouter, Routers, check_routers_fit, fold_routers, state_keys
from storage.checkpoint import StoredTensor, read_layout
from storage.derived_run import native_form_run
from storage.rundir import RunDir

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def fold_problem(routers: Routers, family: Family) -> LprError | None:
    """The one-line error saying why ``routers`` cannot be written in the family's own form, or None."""
    try:
        fold_routers(routers, family)
    except LprError as err:
        return err
    return None


def drop_in_routers(run: RunDir, family: Family) -> tuple[dict[str, LatentPrototypeRouter], dict[str, Any], RunDir]:
    """What a drop-in checkpoint of ``run`` carries: (routers, their per-layer figures, the run they are from).

    The run's own served routers when they fold into the family's form (``router.form: native``, or a
    dot-product LPR the family can express); else the routers distilled natively beside it in
    ``RUN_DIR/forms/native`` (validate's ``native`` variant makes them); else the fold's one-line error.
    """
    routers, metrics = distilled_routers(run)
    if (problem := fold_problem(routers, family)) is None:
        return routers, metrics, run
    native = native_form_run(run)
    if not native.is_complete("distill"):
        hint = f"{problem.hint}; or validate with the variant 'native', which distils them into {native.url}"
        raise LprError(problem.message, hint)
    routers, metrics = distilled_routers(native)
    return routers, metrics, native


def as_gate_routers(routers: dict[str, FamilyRouter], config: Any) -> dict[str, LatentPrototypeRouter]:
    """Each ``FamilyRouter`` as the float32 gate-form LPR that routes as the family's router with its tensors."""
    spec = spec_for(config, latent_dim=1, similarity="dot")
    return {
        name: gate_router(
            router.weight.float(),
            spec,
            logit_bias=None if router.logit_bias is None else router.logit_bias.float(),
            choice_bias=None if router.choice_bias is None else router.choice_bias.float(),
        ).eval()
        for name, router in routers.items()
    }


def _stored_keys(directory: Path, model: nn.Module) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(the checkpoint's layout, model state key → checkpoint key) of a local checkpoint directory."""
    layout = read_layout(directory)
    return layout, checkpoint_keys(model, layout)


def shipped_routers(routers: Routers, model: nn.Module, source: Path) -> dict[str, LatentPrototypeRouter]:
    """``routers`` as ``export --checkpoint`` writes them from the checkpoint in ``source`` for ``model``
    (folded, each tensor rounded to its stored dtype), as gate-form LPRs; the export's one-line errors."""
    family = FAMILIES[family_of(model.config)]
    check_routers_fit(routers, model, source=source)
    folded = fold_routers(routers, family)
    layout, keys = _stored_keys(source, empty_model(model.config))
    rounded = {}
    for site, router in folded.items():
        tensors = {}
        for role, state_key in state_keys(family, site).items():
            stored = layout.get(keys.get(state_key, ""))
            dtype = DTYPES.get(stored.dtype, torch.float32) if stored is not None else torch.float32
            tensors[role] = getattr(router, role).to(dtype)
        rounded[site] = FamilyRouter(tensors["weight"], tensors.get("logit_bias"), tensors.get("choice_bias"))
    return as_gate_routers(rounded, model.config)


def checkpoint_routers(directory: str | Path, model: nn.Module, source: Path) -> dict[str, LatentPrototypeRouter]:
    """The router tensors of the checkpoint in ``directory`` for ``model``'s routers, as gate-form LPRs.

    It must be a checkpoint of ``model``'s source (the checkpoint in ``source``): the same tensor
    names, dtypes and shapes; otherwise a one-line error. (The tensors other than the routers' are
    taken to be the source's, as ``export --checkpoint`` writes them byte for byte.)"""
    directory = Path(directory)
    if not directory.is_dir():
        raise LprError(f"--checkpoint {directory} is not a directory", "pass a directory `export --checkpoint` wrote")
    family = FAMILIES[family_of(model.config)]
    layout, keys = _stored_keys(directory, empty_model(model.config))
    expected = read_layout(source)
    if {k: (v.dtype, v.shape) for k, v in layout.items()} != {k: (v.dtype, v.shape) for k, v in expected.items()}:
        odd = sorted(set(layout) ^ set(expected)) or [k for k in layout if layout[k].shape != expected[k].shape]
        raise LprError(
            f"the checkpoint in {directory} is not one of the run's model {source} (e.g. tensor {(odd or ['?'])[0]})",
            "pass a checkpoint that `export --checkpoint` wrote from this run",
        )
    wanted: dict[str, dict[str, str]] = {}  # router module name → role → checkpoint key
    for site in find_routers(model):
        wanted[site.name] = {}
        for role, state_key in state_keys(family, site.name).items():
            if state_key not in keys:
                raise LprError(
                    f"the checkpoint in {directory} stores no {role.replace('_', ' ')} of router {site.name}",
                    "pass a checkpoint that `export --checkpoint` wrote from this run",
                )
            wanted[site.name][role] = keys[state_key]
    by_file: dict[str, list[str]] = {}
    for roles in wanted.values():
        for key in roles.values():
            by_file.setdefault(layout[key].file, []).append(key)
    read: dict[str, torch.Tensor] = {}
    for file, file_keys in sorted(by_file.items()):
        with safe_open(str(directory / file), "pt") as handle:  # each shard opened once
            read |= {key: handle.get_tensor(key) for key in file_keys}
    roles = ("weight", "logit_bias", "choice_bias")
    found = {name: FamilyRouter(*(read[at[r]] if r in at else None for r in roles)) for name, at in wanted.items()}
    return as_gate_routers(found, model.config)
