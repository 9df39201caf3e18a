"""A drop-in checkpoint served by llama.cpp, an engine no one here wrote, against transformers.

``engine_check`` converts the original checkpoint and the exported one to f32 GGUF with llama.cpp's
own converter (``gguf_convert.py``, in a fresh interpreter), runs both in llama.cpp (the
``llama-cpp-python`` binding) on the same token ids, and compares every position's next-token logits
with transformers' stock ``from_pretrained`` of the same directories. The rebalanced routing is
served when llama.cpp's logits of the exported checkpoint are close to transformers' of it, far
closer than the gap between the original and the rebalanced model.

llama.cpp's source tree (``vendor/llama.cpp`` of the ``llama-cpp-python`` sdist, which is what the
binding is built from) is named by ``$LLAMA_CPP_SOURCE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONVERTER = Path(__file__).with_name("gguf_convert.py")
SOURCE_ENV = "LLAMA_CPP_SOURCE"


def llama_cpp_source() -> Path | None:
    """llama.cpp's source tree from ``$LLAMA_CPP_SOURCE``, if it holds the converter."""
    path = Path(os.environ.get(SOURCE_ENV, "")).expanduser()
    return path if os.environ.get(SOURCE_ENV) and (path / "conversion").is_dir() else None


def to_gguf(source: Path, checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` as an f32 GGUF at ``out``, converted by llama.cpp's converter in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, str(CONVERTER), str(source), str(checkpoint), str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {checkpoint}:\n{done.stderr[-3000:]}")
    return out


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits (T, V) at every position of ``ids`` (one sequence, one batch)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf),
        n_ctx=len(ids),
        n_batch=len(ids),
        n_ubatch=len(ids),
        logits_all=True,
        n_threads=max(1, min(4, os.cpu_count() or 1)),
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@torch.no_grad()
def transformers_logits(directory: Path, ids: list[int]) -> np.ndarray:
    """Stock ``from_pretrained`` (float32) next-token logits (T, V) at every position of ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def engine_check(source: Path, original: Path, exported: Path, ids: list[int], work: Path) -> dict[str, Any]:
    """Figures of llama.cpp serving ``exported`` (and ``original``) against transformers on ``ids``.

    max_abs_diff / position_max_median: llama.cpp vs transformers, each checkpoint, the largest |Δ| over the
    vocabulary at each position (T,), its maximum and median; gap: transformers' rebalanced vs
    original logits (what the routers changed); argmax agreement per checkpoint.
    """
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"tokens": len(ids)}
    logits = {}
    for name, directory in (("original", original), ("exported", exported)):
        gguf = to_gguf(source, directory, work / f"{name}.gguf")
        logits[name] = (transformers_logits(directory, ids), llama_cpp_logits(gguf, ids))
        hf, llama = logits[name]
        per_position = np.abs(hf - llama).max(-1)  # (T,)
        figures[name] = {
            "max_abs_diff": float(per_position.max()),
            # an expert choice at a near-tie can go the other way under another engine's float32 rounding
            # (the original checkpoint too): the bulk of the positions is the comparison, the maximum is reported
            "position_max_median": float(np.median(per_position)),
            "mean_abs_diff": float(np.abs(hf - llama).mean()),
            "argmax_agreement": float((hf.argmax(-1) == llama.argmax(-1)).mean()),
            "gguf_bytes": gguf.stat().st_size,
        }
    hf_exported, llama_exported = logits["exported"]
    hf_original, llama_original = logits["original"]
    figures["gap"] = {
        "transformers_max_abs_diff": float(np.abs(hf_exported - hf_original).max()),
        "transformers_mean_abs_diff": float(np.abs(hf_exported - hf_original).mean()),
        "llama_cpp_max_abs_diff": float(np.abs(llama_exported - llama_original).max()),
    }
    # served as rebalanced: at every position closer to transformers' rebalanced model than to the original
    to_rebalanced = np.abs(llama_exported - hf_exported).max(-1)
    to_original = np.abs(llama_exported - hf_original).max(-1)
    figures["positions_closer_to_rebalanced"] = float((to_rebalanced < to_original).mean())
    return figures
