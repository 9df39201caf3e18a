"""Drop-in checkpoints of tiny models of every family, checked the way a user would load them.

``check_checkpoints`` builds, per family, a tiny model with random gates and biases
(``perturb_gates``), saves it in several shards (so that some shards hold no router), takes LPR
routers that fold (``foldable_routers``: the gates as compact dot-product LPRs, their experts
mixed, the family's bias perturbed), exports the checkpoint, then loads every checkpoint with
stock ``from_pretrained`` in **one fresh interpreter that cannot import this project**
(``stock_routers.py``) and compares its routers' outputs with the in-memory LPRs. Shared by
``tests/test_checkpoint_export.py`` and ``scripts/compat_matrix.py`` (its "drop-in checkpoint" column).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.moe.capture import as_triple
from pipeline.moe.families import FAMILIES
from pipeline.moe.loading import find_routers
from pipeline.router.install import gate_routers
from pipeline.router.lpr import LatentPrototypeRouter
from pipeline.stages.export_checkpoint import export_checkpoint
from pipeline.testing.tiny_families import _block_args, perturb_gates, router_input, tiny_model
from storage.checkpoint import read_layout

STOCK_SCRIPT = Path(__file__).with_name("stock_routers.py")
TOKENS = 64  # router inputs per check
SHARD = "100KB"  # the tiny models (≈ 0.5–1 MB) save as several shards


def foldable_routers(model: torch.nn.Module, family: str, seed: int = 0) -> dict[str, LatentPrototypeRouter]:
    """The model's gates as compact dot-product LPRs, changed so that they route differently and still
    fold: prototypes I + noise (each expert's gate a mix of all), a random logit bias where the family
    has one, a random choice bias where it has one (elsewhere it stays 0, as the family routes)."""
    entry = FAMILIES[family]
    routers = gate_routers(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routers.values():
            experts = router.num_experts
            router.prototypes.add_(0.5 * torch.randn(experts, experts, generator=gen))
            if entry.logit_bias:
                router.encoder.bias.add_(torch.randn(experts, generator=gen))
            if entry.choice_bias:
                router.bias.copy_(0.2 * torch.rand(experts, generator=gen))
    return routers


def _outputs(modules: dict[str, torch.nn.Module], model, family: str, x: torch.Tensor) -> dict[str, tuple]:
    """Each router's (logits, weights, indices) on x (T, H), called as the family's block calls it."""
    found = {}
    for site in find_routers(model):
        with torch.no_grad():
            returned = modules[site.name](router_input(family, x), *_block_args(model, site, family))
        found[site.name] = as_triple(returned, int(site.module.top_k))
    return found


def _prepare(family: str, root: Path, tokenizer, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Source checkpoint, routers, export, inputs and expected outputs of one family; (job item, context)."""
    model = tiny_model(
        family,
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    perturb_gates(model, family, seed=seed)
    source, out = root / "source", root / "checkpoint"
    model.save_pretrained(source, max_shard_size=SHARD)
    tokenizer.save_pretrained(source)
    routers = foldable_routers(model, family, seed)
    written = export_checkpoint(routers, source, out)
    return stock_case(family, model, routers, root, written, seed=seed)


def stock_case(
    family: str, model: torch.nn.Module, routers: dict, root: Path, written: dict[str, Any], *, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job item, context) that checks the checkpoint ``export_checkpoint`` wrote (``written``) from the source
    ``root/source`` into ``root/checkpoint``: stock routers against ``routers`` (in memory) and the original
    gates of ``model``, on random router inputs saved in ``root``."""
    source, out = root / "source", root / "checkpoint"
    # router inputs of RMS ≈ 0.2: logits of a few units with the random gates (as a trained gate gives)
    x = 0.2 * torch.randn(TOKENS, model.config.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    save_file({"x": x}, str(root / "x.safetensors"))
    entry = FAMILIES[family]
    block_bias = entry.choice_bias[1:] if entry.choice_bias and entry.choice_bias.startswith("^") else None
    item = {
        "path": str(out),
        "inputs": str(root / "x.safetensors"),
        "outputs": str(root / "stock.safetensors"),
        "routers": [
            {
                "name": site.name,
                "block": site.name.rpartition(".")[0] if block_bias else None,
                "block_bias": block_bias,
                "three_d": "[B, S, H]" in entry.receives,
            }
            for site in find_routers(model)
        ],
    }
    original = {site.name: site.module for site in find_routers(model)}
    context = {
        "written": written,
        "expected": _outputs(routers, model, family, x),
        "original": _outputs(original, model, family, x),
        "source": source,
        "out": out,
    }
    return item, context


def differing_tensors(source: Path, out: Path) -> set[str] | None:
    """Checkpoint keys whose bytes differ between two checkpoints; None when their keys, dtypes or
    shapes differ."""
    before, after = read_layout(source), read_layout(out)
    if {k: (v.dtype, v.shape) for k, v in before.items()} != {k: (v.dtype, v.shape) for k, v in after.items()}:
        return None
    differing = set()
    for key, stored in before.items():
        mine = after[key]
        with (source / stored.file).open("rb") as a, (out / mine.file).open("rb") as b:
            a.seek(stored.start)
            b.seek(mine.start)
            if a.read(stored.end - stored.start) != b.read(mine.end - mine.start):
                differing.add(key)
    return differing


def _compare(context: dict[str, Any], stock_file: Path) -> dict[str, Any]:
    """The stock routers' outputs against the LPRs' (and the original gates'), and the files."""
    stock = load_file(str(stock_file))
    loading = json.loads(Path(str(stock_file) + ".json").read_text())
    logits_diff = weights_diff = 0.0
    same_indices, from_original, changed_share = True, float("inf"), 1.0
    for name, (logits, weights, indices) in context["expected"].items():
        returned = tuple(stock[f"{name}/{i}"] for i in range(sum(k.startswith(name + "/") for k in stock)))
        got_logits, got_weights, got_indices = as_triple(returned, indices.shape[-1])
        got_logits = got_logits.reshape(logits.shape)
        logits_diff = max(logits_diff, float((got_logits - logits).abs().max()))
        weights_diff = max(weights_diff, float((got_weights.float() - weights.float()).abs().max()))
        same_indices &= torch.equal(got_indices, indices)
        old_logits, _, old_indices = context["original"][name]
        from_original = min(from_original, float((got_logits - old_logits).abs().max()))
        moved = (got_indices.sort(-1).values != old_indices.sort(-1).values).any(-1).float().mean()
        changed_share = min(changed_share, float(moved))
    written = context["written"]
    differing = differing_tensors(context["source"], context["out"])
    return {
        "form": written["form"],
        "logits_max_abs_diff": logits_diff,
        "weights_max_abs_diff": weights_diff,
        "indices_equal": bool(same_indices),
        "original_logits_min_diff": from_original,  # max |Δ logits| against the original gate, least router
        "original_indices_changed_share": changed_share,  # share of tokens whose experts moved, least router
        "missing_keys": loading.get("missing_keys", []),
        "unexpected_keys": loading.get("unexpected_keys", []),
        "mismatched_keys": loading.get("mismatched_keys", []),
        "stock_modules": sorted({c.split(".")[0] for c in [loading["model_class"], *loading["router_classes"]]}),
        "router_tensors": len(written["router_tensors"]),
        "differing_tensors": None if differing is None else len(differing),
        "differing_outside_routers": None if differing is None else sorted(differing - set(written["router_tensors"])),
        "linked": len(written["linked"]),
        "rewritten": len(written["rewritten"]),
    }


def check_checkpoints(families: list[str], root: Path, tokenizer, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Export and check a drop-in checkpoint of each family (one fresh interpreter for all of them);
    per family the comparison (``_compare``), or ``{"error": one line}`` where a step failed."""
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    items, contexts = [], {}
    for family in families:
        (root / family).mkdir(parents=True, exist_ok=True)
        try:
            item, contexts[family] = _prepare(family, root / family, tokenizer, seed)
            items.append(item)
        except Exception as err:  # the matrix says what failed; the tests assert on it
            results[family] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    results |= check_in_fresh_process(items, contexts, root)
    seconds = round(time.time() - started, 1)
    return {family: results[family] | {"batch_seconds": seconds} for family in families}


def check_in_fresh_process(
    items: list[dict[str, Any]], contexts: dict[str, dict[str, Any]], root: Path
) -> dict[str, dict[str, Any]]:
    """Load every checkpoint of ``items`` (``stock_case``) in one fresh interpreter that cannot import this
    project; per key of ``contexts`` (in the items' order) the comparison, or ``{"error": one line}``."""
    results: dict[str, dict[str, Any]] = {}
    job = root / "job.json"
    job.write_text(json.dumps({"checkpoints": items}))
    done = subprocess.run(
        [sys.executable, "-I", str(STOCK_SCRIPT), str(job)], capture_output=True, text=True, timeout=1800
    )
    lines = done.stdout.strip().splitlines()
    project = json.loads(lines[-1])["project_modules_imported"] if done.returncode == 0 and lines else None
    for family, context in contexts.items():
        stock_file = Path(context["out"]).parent / "stock.safetensors"
        if done.returncode != 0 or not stock_file.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results[family] = {"error": f"stock loading failed: {tail[:200]}"}
            continue
        results[family] = _compare(context, stock_file) | {"project_modules_imported": project}
    return results


def passes(result: dict[str, Any], bar: float = 1e-5) -> bool:
    """What the tests assert, as one verdict (the compat matrix's column)."""
    return (
        "error" not in result
        and result["logits_max_abs_diff"] <= bar
        and result["indices_equal"]
        and result["original_logits_min_diff"] > 1e-3
        and result["original_indices_changed_share"] > 0
        and not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"])
        and result["stock_modules"] == ["transformers"]
        and result["project_modules_imported"] == []
        and result["differing_outside_routers"] == []
        and result["differing_tensors"] >= 1
    )
