"""lm-eval tasks shipped with lpr-distill (YAML task configs + JSONL data), run fully offline."""
