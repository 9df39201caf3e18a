"""The latent basis of a layer's router inputs: exact PCA from a covariance streamed over row blocks.

Memory is O(H² + block·H) whatever the number of rows (a 7168-wide layer: 400 MB of float64
covariance), only the top ``latent_dim`` eigenpairs are computed (``top_eigenpairs``), and the
result equals scikit-learn's full-SVD PCA on the same rows up to signs, which are fixed like
scikit-learn's ``svd_flip`` (largest-magnitude loading positive).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas
from scipy.sparse.linalg import eigsh

from pipeline.errors import LprError


@dataclass(frozen=True)
class LatentBasis:
    """z = (x − mean) @ components.T"""

    mean: np.ndarray  # (H,) float32
    components: np.ndarray  # (d, H) float32, orthonormal rows, by decreasing variance
    explained_variance: np.ndarray  # (d,) float32, variance along each component
    variance_kept: float  # share of the total variance the d components keep

    def project(self, x: torch.Tensor) -> np.ndarray:
        """x: (n, H) any float dtype → (n, d) float32.

        As the router's encoder computes it, x·componentsᵀ − components·mean: no centred (n, H) copy
        (measured at H 2048: the copy cost more than the product)."""
        components = torch.from_numpy(self.components)
        z = x.to(torch.float32) @ components.T
        z -= components @ torch.from_numpy(self.mean)
        return z.numpy()


def top_eigenpairs(cov: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues (count,) of the symmetric ``cov`` (H, H) float64, descending, and
    their eigenvectors (H, count).

    Lanczos (ARPACK, to machine precision, seeded start) where ``count`` is a small part of H: a full
    ``eigh`` computes all H pairs, measured on 2 cores at H 2048 (d 64): 6.6 s against 0.3–4 s (this
    machine under load), and its cost grows as H³ (DeepSeek-V3's 7168: minutes). Dense where H is small.
    """
    hidden = cov.shape[0]
    if hidden <= 256 or 4 * count >= hidden:
        values, vectors = np.linalg.eigh(cov)
        return values[::-1][:count].copy(), vectors[:, ::-1][:, :count].copy()
    start = np.random.default_rng(0).standard_normal(hidden)
    values, vectors = eigsh(cov, k=count, which="LA", tol=0, v0=start)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def fit_basis(blocks: Iterable[torch.Tensor], latent_dim: int) -> LatentBasis:
    """PCA of the rows of ``blocks`` (each (n_b, H)), keeping ``latent_dim`` components."""
    total = None
    outer = None
    rows = 0
    for block in blocks:
        x = block.to(torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x).all(dim=1)).sum())
            raise LprError(
                f"{bad:,} rows of the states contain NaN or Inf",
                "dump again with --force in a wider dtype (--set dump.dtype=float32); if the model itself "
                "overflows, load it in float32 (--set model.dtype=float32)",
            )
        total = x.sum(0, dtype=torch.float64) if total is None else total + x.sum(0, dtype=torch.float64)
        # float32 products of one block, accumulated in float64; the upper triangle only (BLAS syrk, on the
        # row-major block's transposed view, no copy): 1.6-2x faster than x.T @ x on 2 cores at H 2048
        gram = blas.ssyrk(1.0, x.contiguous().numpy().T, trans=0).astype(np.float64)
        outer = gram if outer is None else outer + gram
        rows += x.shape[0]
    if rows < 2 or total is None or outer is None:
        raise LprError(f"PCA needs at least 2 rows, got {rows}", "dump more tokens")
    hidden = total.shape[0]
    if latent_dim > hidden:
        raise LprError(
            f"cluster.latent_dim={latent_dim} should be ≤ the hidden size {hidden}",
            f"set --set cluster.latent_dim={min(64, hidden)}",
        )
    mean = total / rows
    outer = np.triu(outer) + np.triu(outer, 1).T
    cov = (outer - rows * np.outer(mean.numpy(), mean.numpy())) / (rows - 1)
    values, vectors = top_eigenpairs(cov, latent_dim)
    vectors = torch.from_numpy(vectors.T.copy())  # (d, H)
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(1, keepdim=True)))
    vectors = vectors * signs
    total_var = float(np.trace(cov))
    values = torch.from_numpy(values).clamp_min(0)
    return LatentBasis(
        mean=mean.float().numpy(),
        components=vectors.float().contiguous().numpy(),
        explained_variance=values.float().numpy(),
        variance_kept=float(values.sum()) / total_var if total_var > 0 else 1.0,
    )
