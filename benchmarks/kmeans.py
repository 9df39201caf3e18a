"""Balanced k-means against its anchors, on the same data in one run.

Data: a skewed Gaussian mixture (Zipf component weights, per-component scales), N × d, k clusters.
Compared, from the same initial centroids and with the same number of iterations:

* plain ``faiss.Kmeans`` on the full data (``max_points_per_centroid`` raised: FAISS would otherwise
  train on a 256·k subsample) — the speed anchor; unbalanced;
* ``faiss.Kmeans`` then ``faiss.contrib.clustering.balanced_assignment_with_penalties`` — fast and
  approximately balanced;
* ``k-means-constrained`` (exact min-cost flow at every step: balanced Lloyd with exact
  assignments), against ours on the same rows: a strided 10k-row subsample and then the full data
  by default (≈ 5.5 minutes here: its time grows faster than N, 6.5 s at 10k rows, 63 s at 50k; the
  headline figures are from the largest size), or the sizes given to ``--kmc-rows``;
* ours, top-1 and top-2.

Prints one line per method, then one JSON line of figures: time ratios, size spread (max/min
cluster size), MSE relative to plain k-means, where our time goes (distances vs auction vs centroid
updates; bids per slot, in all and per step), the *floor* (every step as cheap as our cheapest one,
where nobody bids after the opening round: the most that fewer bids could give) and the load
average: on a machine shared with other processes FAISS's OpenMP threads lose far more than our
mostly single-threaded auction (measured here: plain FAISS 1 s idle, 4–19 s at a load average of
5–7), so the time ratios of a loaded run flatter us; ``--threads 1`` runs FAISS and our compiled
loops on one thread each, which contention distorts much less. (Beside CPU FAISS our compiled loops
always run on one thread: ``pipeline.clustering.kmeans.compiled_threads``.)
Usage: ``python benchmarks/kmeans.py [--rows 200000] [--threads 1] [--kmc-rows 10000 0]``
(``--kmc-rows 10000``: a quick run, k-means-constrained on 10k rows only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import faiss
import numba
import numpy as np
from faiss.contrib.clustering import balanced_assignment_with_penalties

from pipeline.clustering.kmeans import balanced_kmeans


def skewed_mixture(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, k + 1)
    component = rng.choice(k, size=n, p=weights / weights.sum())
    means = rng.normal(size=(k, d)).astype(np.float32) * 2
    scales = rng.uniform(0.5, 2.0, size=k).astype(np.float32)
    return (means[component] + rng.normal(size=(n, d)).astype(np.float32) * scales[component, None]).astype(np.float32)


def mse(x: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Mean squared distance per slot. assignment: (N, kp)."""
    total = 0.0
    for hand in range(assignment.shape[1]):
        total += float(((x - centroids[assignment[:, hand]]) ** 2).sum(dtype=np.float64))
    return total / assignment.size


def spread(assignment: np.ndarray, k: int) -> float:
    sizes = np.bincount(assignment.reshape(-1), minlength=k)
    return float(sizes.max() / max(sizes.min(), 1)) if sizes.min() > 0 else float("inf")


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def plain_faiss(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[np.ndarray, np.ndarray]:
    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=niter, seed=1, max_points_per_centroid=x.shape[0] + 1)
    km.train(x, init_centroids=init)
    _, assignment = km.index.search(x, 1)
    return km.centroids, assignment


def report(name: str, seconds: float, size_spread: float, error: float) -> None:
    print(f"{name:<34} {seconds:8.2f} s   size spread {size_spread:8.3f}   MSE {error:.3f}")


def against_kmc(x: np.ndarray, init: np.ndarray, rows: int, k: int, iterations: int) -> dict[str, object]:
    """k-means-constrained and ours on the same strided ``rows`` of x, from the same start."""
    from k_means_constrained import KMeansConstrained

    sub = np.ascontiguousarray(x[:: max(1, len(x) // rows)][:rows])
    kmc = KMeansConstrained(
        n_clusters=k,
        size_min=len(sub) // k,
        size_max=-(-len(sub) // k),
        init=init,
        n_init=1,
        max_iter=iterations,
        random_state=0,
    )
    _, t_kmc = timed(lambda: kmc.fit(sub))
    mse_kmc = mse(sub, kmc.cluster_centers_.astype(np.float32), kmc.labels_[:, None])
    (ours, _), t_ours = timed(lambda: balanced_kmeans(sub, k, niter=iterations, init=init))
    mse_ours = mse(sub, ours.centroids, ours.assignment)
    _, t_plain = timed(lambda: plain_faiss(sub, init, iterations))
    print(
        f"k-means-constrained ({len(sub):,} rows) {t_kmc:8.2f} s  spread {spread(kmc.labels_, k):8.2f}  "
        f"MSE {mse_kmc:.3f}  | ours {t_ours:.2f} s MSE {mse_ours:.3f}  | faiss {t_plain:.2f} s"
    )
    return {
        "kmc_rows": len(sub),
        "kmc_seconds": round(t_kmc, 3),
        "kmc_iterations": int(getattr(kmc, "n_iter_", -1)),
        "ours_seconds": round(t_ours, 3),
        "faiss_seconds": round(t_plain, 3),
        "speedup_vs_kmc": round(t_kmc / t_ours, 1),
        "mse_ratio_ours_vs_kmc": round(mse_ours / mse_kmc, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--kmc-rows",
        type=int,
        nargs="+",
        default=[10_000, 0],
        help="rows for k-means-constrained, one run each, smallest first (0: all; default: 10000 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for FAISS, and for our compiled loops when FAISS runs on a GPU (0: all cores)",
    )
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    x = skewed_mixture(args.rows, args.dims, args.k, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    init = x[np.sort(rng.choice(len(x), args.k, replace=False))].copy()
    # numba compiles (and caches on disk) the top-1 and the top-k code on first use: not in the timings
    _, compile_seconds = timed(lambda: [balanced_kmeans(x[:500], 4, top_k=kp, niter=2) for kp in (1, 2)])
    figures: dict[str, object] = {"rows": args.rows, "dims": args.dims, "k": args.k, "iterations": args.iterations}
    figures |= {"threads": args.threads or os.cpu_count(), "load_average_start": round(os.getloadavg()[0], 2)}
    figures["jit_warmup_seconds"] = round(compile_seconds, 3)

    (c_plain, a_plain), t_plain = timed(lambda: plain_faiss(x, init, args.iterations))
    mse_plain = mse(x, c_plain, a_plain)
    report("faiss.Kmeans (full data)", t_plain, spread(a_plain, args.k), mse_plain)

    a_pen, t_pen = timed(lambda: balanced_assignment_with_penalties(x, c_plain, alpha=0.1, maxk=args.k)[0][:, None])
    t_pen += t_plain
    mse_pen = mse(x, c_plain, a_pen)
    report("faiss.Kmeans + penalties", t_pen, spread(a_pen, args.k), mse_pen)

    (ours, stats), t_ours = timed(lambda: balanced_kmeans(x, args.k, niter=args.iterations, init=init))
    mse_ours = mse(x, ours.centroids, ours.assignment)
    report("ours, top-1", t_ours, spread(ours.assignment, args.k), mse_ours)

    (ours2, _), t_ours2 = timed(lambda: balanced_kmeans(x, args.k, top_k=2, niter=args.iterations, init=init))
    mse_ours2 = mse(x, ours2.centroids, ours2.assignment)
    report("ours, top-2 (per slot)", t_ours2, spread(ours2.assignment, args.k), mse_ours2)

    figures |= {
        "faiss_seconds": round(t_plain, 3),
        "ours_seconds": round(t_ours, 3),
        "ours_top2_seconds": round(t_ours2, 3),
        "time_ratio_vs_faiss": round(t_ours / t_plain, 2),
        "time_ratio_top2_vs_faiss": round(t_ours2 / t_plain, 2),
        "spread_faiss": round(spread(a_plain, args.k), 3),
        "spread_penalties": round(spread(a_pen, args.k), 3),
        "spread_ours": round(spread(ours.assignment, args.k), 6),
        "slot_spread_ours_top2": round(spread(ours2.assignment, args.k), 6),
        "size_diff_ours": int(stats["size_max"] - stats["size_min"]),
        "mse_ratio_ours_vs_faiss": round(mse_ours / mse_plain, 4),
        "mse_ratio_penalties_vs_faiss": round(mse_pen / mse_plain, 4),
        "penalties_seconds": round(t_pen, 3),
        "ours_distance_seconds": round(stats["distance_seconds"], 3),
        "ours_auction_seconds": round(stats["auction_seconds"], 3),
        "ours_bids_per_slot": round(stats["bids_per_slot_per_phase"] * stats["phases"], 2),
        "ours_update_seconds": round(stats["update_seconds"], 3),
        "ours_bids_per_slot_by_step": [round(b, 2) for b in stats["bids_per_slot_by_step"]],
    }
    # what our run would take if every step were as cheap as its cheapest (distances, one opening round,
    # nobody bidding after it) — the part of the gap to FAISS that fewer bids cannot close
    floor = len(stats["step_seconds"]) * min(stats["step_seconds"]) + stats["update_seconds"]
    figures |= {
        "ours_cheapest_step_seconds": round(min(stats["step_seconds"]), 4),
        "ours_floor_seconds": round(floor, 3),
        "floor_ratio_vs_faiss": round(floor / t_plain, 2),
    }

    if importlib.util.find_spec("k_means_constrained") is None:
        print("k-means-constrained not installed (pip install -e '.[bench]'): skipped")
    else:
        runs = [against_kmc(x, init, rows or len(x), args.k, args.iterations) for rows in args.kmc_rows]
        figures["kmc"] = runs
        # the headline: k-means-constrained on the most rows asked for (by default the benchmark's data)
        largest = max(runs, key=lambda run: run["kmc_rows"])
        figures |= {key: largest[key] for key in ("speedup_vs_kmc", "mse_ratio_ours_vs_kmc")}
    figures["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
