"""Safe loading (issue 9, item 4): no pickle anywhere, ``torch.load`` only with ``weights_only=True``,
``trust_remote_code`` off by default, routers and prototypes read only as safetensors / JSON, and
no name taken from data (a layer name in a store or manifest, a stage path) can lead a stage to
read or write outside its run directory.

The source checks parse the code (``ast``), so a comment or a docstring that mentions pickle does
not count and an aliased call (``from torch import load``) does.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
import zarr

from pipeline.config import ModelConfig, RunConfig
from pipeline.errors import LprError
from storage.layer_files import read_layer_meta, write_layer_files
from storage.prototypes import read_layer
from storage.routers import read_routers, write_routers
from storage.rundir import RunDir, safe_name
from storage.states import StatesReader

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "storage", "flows")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "read_pickle"}


def _sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 30  # the whole tree, not an empty glob
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _findings(path: Path) -> list[str]:
    """Every unsafe construct in one file, as 'file:line: what'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    aliases: dict[str, str] = {}  # local name -> dotted origin, e.g. load -> torch.load
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            keywords = {k.arg: k.value for k in node.keywords}
            if full in ("torch.load", "torch.serialization.load"):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if full in UNSAFE_CALLS or full.endswith(".read_pickle"):
                found.append(f"{where}:{node.lineno}: {full}")
            if full.endswith("load") and "allow_pickle" in keywords:
                value = keywords["allow_pickle"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where}:{node.lineno}: {full}(allow_pickle=...)")
            value = keywords.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                found.append(f"{where}:{node.lineno}: trust_remote_code=True")
    return found


def test_no_pickle_no_unsafe_torch_load_no_remote_code_in_the_source():
    problems = [finding for path in _sources() for finding in _findings(path)]
    assert problems == []


def test_the_checker_finds_what_it_should(tmp_path):
    """The source check is not vacuous: each construct it forbids is found in a planted file."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import pickle\nimport torch\nfrom torch import load as tl\nimport numpy as np\nimport yaml\n"
        "torch.load('x')\ntl('y', weights_only=False)\nnp.load('z', allow_pickle=True)\nyaml.load('a')\n"
        "f(trust_remote_code=True)\ntorch.load('ok', weights_only=True)\n"
    )
    found = _findings(planted)
    assert sorted(line.split(": ", 1)[1] for line in found) == sorted(
        [
            "import pickle",
            "torch.load without weights_only=True",
            "torch.load without weights_only=True",
            "numpy.load(allow_pickle=...)",
            "yaml.load",
            "trust_remote_code=True",
        ]
    )


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert RunConfig().model.trust_remote_code is False


class _Payload:
    """Unpickling this creates a marker file: proof that a reader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_routers_and_prototypes_are_never_unpickled(tmp_path):
    """A pickle (a torch.save file is one) planted where safetensors belong is refused, never run."""
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Payload(marker))
    # exported routers: a valid routers.json, a pickle as routers.safetensors
    out = write_routers(tmp_path / "export", {"a.w": torch.zeros(2)}, {"family": "qwen3_moe"}, "card")
    (out / "routers.safetensors").write_bytes(payload)
    with pytest.raises(LprError, match=r"routers\.safetensors is missing or not a valid safetensors file"):
        read_routers(out)
    torch.save({"w": torch.zeros(2)}, out / "routers.safetensors")  # torch's own format is pickle-based too
    with pytest.raises(LprError, match="not a valid safetensors file"):
        read_routers(out)
    # a per-layer prototypes file
    run = RunDir(str(tmp_path / "run"))
    directory = run.path("prototypes")
    write_layer_files(run, directory, "layer_000", payload, {"layer": "layer_000"})
    with pytest.raises(Exception, match=r"(?i)header|deserializ"):
        read_layer(run, directory, "layer_000")
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["..", ".", "../escape", "a/b", "/etc/passwd", "s3://bucket/key", "file:///tmp/x", "", "a\\b", "~"]
)
def test_unsafe_names_are_refused(tmp_path, name):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(LprError, match="is not a safe name inside the run directory"):
        run.path(name)
    with pytest.raises(LprError, match="is not a safe name inside the run directory"):
        run.path("prototypes", name)
    with pytest.raises(LprError, match=r"layer .* is not a safe name"):
        write_layer_files(run, run.path("prototypes"), name, b"x", {})
    with pytest.raises(LprError, match=r"layer .* is not a safe name"):
        read_layer_meta(run, run.path("prototypes"), name)
    assert {p.name for p in tmp_path.rglob("*")} <= {"run", "prototypes"}  # nothing written anywhere


def test_plain_names_are_kept():
    assert [safe_name(n) for n in ("layer_000", "states.zarr", "prototypes.partial", "a-b.c")] == [
        "layer_000",
        "states.zarr",
        "prototypes.partial",
        "a-b.c",
    ]


def test_a_crafted_states_store_cannot_name_a_path(tmp_path):
    """A store whose layer list points outside the run directory is refused when it is opened."""
    url = str(tmp_path / "run" / "states.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.attrs.update({"format_version": 1, "layers": ["layer_000", "../../outside"], "committed_rows": 0})
    with pytest.raises(LprError, match=r"layer '\.\./\.\./outside' is not a safe name"):
        StatesReader(url)
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()


def test_run_paths_stay_inside_the_run_directory(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    root = os.path.realpath(run.root)
    for stage in ("dump", "cluster", "distill", "validate", "export"):
        for path in (run.output_path(stage), run.partial_path(stage), run.manifest_path(stage)):
            assert os.path.realpath(path).startswith(root + os.sep)
