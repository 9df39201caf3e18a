"""Build the shipped local lm-eval task ``lpr_demo_cloze`` from the demo corpus's held-out documents.

Each item: a context (the lines of a held-out standard-library document — source code, docstrings
or pydoc prose — up to a cut point) and four candidate next lines: the true one and three lines of
similar length from other held-out documents. A model that learned the corpus's code and prose
picks the true line far more often than chance (25 %). Documents come from the held-out side of
the demo's split (never trained, dumped or calibrated on).

Regenerate with ``python -m pipeline.evaluation.lm_eval_tasks.build`` (deterministic for a given Python version).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.corpus import Document, is_heldout

TASK = "lpr_demo_cloze"
HERE = Path(__file__).parent
DATA = HERE / f"{TASK}.jsonl"


def candidate_lines(doc: Document, *, min_chars: int, max_chars: int) -> list[int]:
    """Indices of lines that make a fair question: long enough, not a blank or a repeated line."""
    lines = doc.text.split("\n")
    seen: set[str] = set()
    out = []
    for i, line in enumerate(lines):
        text = line.strip()
        if i >= 3 and min_chars <= len(text) <= max_chars and text not in seen:
            out.append(i)
        seen.add(text)
    return out


def build_items(
    docs: list[Document], *, items: int, seed: int = 0, context_chars: int = 320, per_doc: int = 2
) -> list[dict]:
    """Multiple-choice cloze items (context, 4 choices, label) from ``docs``; ``items`` at most."""
    rng = np.random.default_rng(seed)
    pool = [(doc, i) for doc in docs for i in candidate_lines(doc, min_chars=20, max_chars=100)]
    lines_of = {doc.name: doc.text.split("\n") for doc in docs}
    by_length: dict[int, list[str]] = {}
    for doc, i in pool:
        line = lines_of[doc.name][i]
        by_length.setdefault(len(line.strip()) // 10, []).append(line)
    out: list[dict] = []
    used: dict[str, int] = {}
    for k in rng.permutation(len(pool)):
        doc, i = pool[k]
        if used.get(doc.name, 0) >= per_doc:
            continue
        lines = lines_of[doc.name]
        true = lines[i]
        others = [line for line in by_length[len(true.strip()) // 10] if line.strip() not in set(lines)]
        if len(others) < 3:
            continue
        distractors = [others[j] for j in rng.choice(len(others), 3, replace=False)]
        context = "\n".join(lines[:i])[-context_chars:]
        label = int(rng.integers(0, 4))
        choices = [*distractors[:label], true, *distractors[label:]]
        out.append(
            {"id": f"{doc.name}:{i}", "context": context, "choices": ["\n" + c for c in choices], "label": label}
        )
        used[doc.name] = used.get(doc.name, 0) + 1
        if len(out) == items:
            break
    return out


def main(items: int = 250, max_chars: int = 14_000_000, heldout_fraction: float = 0.1) -> None:
    from pipeline.demo.corpus import demo_documents

    docs = [d for d in demo_documents(max_chars=max_chars) if is_heldout(d.name, heldout_fraction)]
    rows = build_items(docs, items=items)
    DATA.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} items from {len(docs)} held-out documents → {DATA}")


if __name__ == "__main__":
    main()
