"""Serve a run's drop-in checkpoint with llama.cpp and compare its logits with transformers'.

Usage: ``LLAMA_CPP_SOURCE=…/vendor/llama.cpp python scripts/llama_cpp_check.py RUN_DIR CHECKPOINT_DIR
[--tokens 128] [--sequences 4]``. The model is the run's ``model.path``; the token ids are the first
held-out sequences of the run's corpus. Prints one JSON line per sequence
(``pipeline.testing.llama_cpp.engine_check``), then one with the maxima over them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=4)
    args = parser.parse_args()

    from pipeline.config import build_config, parse_yaml
    from pipeline.evaluation.heldout import heldout_sequences
    from pipeline.moe.loading import load_tokenizer, resolve_model_path
    from pipeline.testing.llama_cpp import SOURCE_ENV, engine_check, llama_cpp_source
    from storage.rundir import RunDir

    source = llama_cpp_source()
    if source is None:
        raise SystemExit(
            f"set ${SOURCE_ENV} to llama.cpp's source tree (vendor/llama.cpp of the llama-cpp-python sdist)"
        )
    run = RunDir(args.run_dir)
    cfg = build_config(parse_yaml(run.read_config() or "", origin=run.path("config.yaml")))
    model_dir = Path(resolve_model_path(cfg))
    held = heldout_sequences(cfg, load_tokenizer(cfg.model, str(model_dir)), args.sequences)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for index, sequence in enumerate(held.ids):
            ids = [int(i) for i in sequence[: args.tokens]]
            rows.append(engine_check(source, model_dir, args.checkpoint, ids, Path(work) / str(index)))
            print(json.dumps({"sequence": index, **rows[-1]}), flush=True)
    worst = {
        "sequences": len(rows),
        "tokens": sum(row["tokens"] for row in rows),
        "exported_max_abs_diff": max(row["exported"]["max_abs_diff"] for row in rows),
        "exported_position_max_median": max(row["exported"]["position_max_median"] for row in rows),
        "original_max_abs_diff": max(row["original"]["max_abs_diff"] for row in rows),
        "gap_max_abs_diff": min(row["gap"]["transformers_max_abs_diff"] for row in rows),
        "argmax_agreement": min(row["exported"]["argmax_agreement"] for row in rows),
        "positions_closer_to_rebalanced": min(row["positions_closer_to_rebalanced"] for row in rows),
    }
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
