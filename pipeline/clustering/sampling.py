"""Which rows of a states store to read: whole chunks drawn at random, so a sample spans many documents
and each read is one chunk."""

from __future__ import annotations

import numpy as np


def sample_ranges(num_rows: int, chunk_rows: int, sample_rows: int, seed: int) -> list[tuple[int, int]]:
    """Row ranges (whole chunks drawn at random, in store order) holding min(sample_rows, num_rows) rows."""
    starts = list(range(0, num_rows, chunk_rows))
    if num_rows > sample_rows:
        order = np.random.default_rng(seed).permutation(len(starts))
        picked, total = [], 0
        for index in order:
            picked.append(starts[index])
            total += min(chunk_rows, num_rows - starts[index])
            if total >= sample_rows:
                break
        starts = sorted(picked)
    ranges, left = [], min(sample_rows, num_rows)
    for start in starts:
        stop = min(start + chunk_rows, num_rows, start + left)
        ranges.append((start, stop))
        left -= stop - start
        if left == 0:
            break
    return ranges
