"""Run as a script, in a fresh interpreter that cannot import this project: load checkpoints with stock
``AutoModelForCausalLM.from_pretrained`` (no ``trust_remote_code``) and record their routers' outputs.

``python -I pipeline/testing/stock_routers.py JOB.json``; the job lists checkpoints, each with the
router module names to call, the input file (safetensors with ``x`` (T, H) float32) and where to
write the outputs (``<router>/<i>``: the router's returned tensors, in order) and the loading info
(JSON). Imports nothing from ``pipeline`` or ``storage``, and says so in its output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def _forget_project() -> None:
    """Drop the editable install's finder and any path that holds the project, so it cannot be imported."""

    def origin(finder: object) -> str:  # finders are classes (the editable one) or instances
        return getattr(finder if isinstance(finder, type) else type(finder), "__module__", "")

    sys.meta_path[:] = [f for f in sys.meta_path if not origin(f).startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "pipeline", "__init__.py"))]
    importlib.invalidate_caches()


def run(job: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    for item in job["checkpoints"]:
        model, loading = AutoModelForCausalLM.from_pretrained(
            item["path"], dtype=torch.float32, trust_remote_code=False, output_loading_info=True
        )
        model.eval()
        x = load_file(item["inputs"])["x"]
        outputs = {}
        for router in item["routers"]:
            module = model.get_submodule(router["name"])
            args = [getattr(model.get_submodule(router["block"]), router["block_bias"])] if router["block"] else []
            with torch.no_grad():
                returned = module(x[None] if router["three_d"] else x, *args)
            for i, tensor in enumerate(returned):
                outputs[f"{router['name']}/{i}"] = tensor.detach().contiguous()
        save_file(outputs, item["outputs"])
        report = {key: sorted(map(str, value)) for key, value in loading.items()}
        report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
        report["router_classes"] = sorted({type(model.get_submodule(r["name"])).__module__ for r in item["routers"]})
        with open(item["outputs"] + ".json", "w") as handle:
            json.dump(report, handle)
    project = sorted(name for name in sys.modules if name.split(".")[0] in ("pipeline", "storage"))
    print(json.dumps({"project_modules_imported": project}))


if __name__ == "__main__":
    _forget_project()
    if importlib.util.find_spec("pipeline") is not None:
        raise SystemExit("the project is still importable: this check would not be a fresh process")
    with open(sys.argv[1]) as handle:
        run(json.load(handle))
