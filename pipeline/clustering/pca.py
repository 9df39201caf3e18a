"""The latent basis of a layer's router inputs: exact PCA from a covariance streamed over row blocks.

Memory is O(H² + block·H) whatever the number of rows (a 7168-wide layer: 400 MB of float64
covariance). All in torch: through SciPy's BLAS (a syrk Gram, ARPACK's Lanczos, faster) a layer
clustered alone in a fresh process and the same layer clustered after another came out different in
the last bits, and a flow must give the same prototypes on every runner (docs/history.md). The result equals
scikit-learn's full-SVD PCA on the same rows up to signs, which are fixed like scikit-learn's
``svd_flip`` (largest-magnitude loading positive).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

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
        gram = (x.T @ x).double()  # float32 products of one block, accumulated in float64
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
    cov = (outer - rows * torch.outer(mean, mean)) / (rows - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values = values.flip(0).clamp_min(0)
    vectors = vectors.flip(1)[:, :latent_dim].T  # (d, H)
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(1, keepdim=True)))
    vectors = vectors * signs
    total_var = float(values.sum())
    return LatentBasis(
        mean=mean.float().numpy(),
        components=vectors.float().contiguous().numpy(),
        explained_variance=values[:latent_dim].float().numpy(),
        variance_kept=float(values[:latent_dim].sum()) / total_var if total_var > 0 else 1.0,
    )
