"""The PCA basis against scikit-learn, and the cluster↔expert matching on planted routings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from pipeline.clustering.matching import match_clusters
from pipeline.clustering.pca import fit_basis
from pipeline.errors import LprError


def test_basis_equals_sklearn_pca_over_blocks():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2000, 24)) @ rng.normal(size=(24, 24)) + 3.0).astype(np.float32)
    blocks = (torch.from_numpy(x[i : i + 300]).half().float() for i in range(0, 2000, 300))
    basis = fit_basis(blocks, 6)
    reference = PCA(n_components=6, svd_solver="full").fit(x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(basis.mean, reference.mean_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(basis.explained_variance, reference.explained_variance_, rtol=1e-3)
    np.testing.assert_allclose(np.abs(basis.components @ reference.components_.T), np.eye(6), atol=1e-3)
    assert basis.variance_kept == pytest.approx(reference.explained_variance_ratio_.sum(), rel=1e-4)
    z = basis.project(torch.from_numpy(x[:10]))
    np.testing.assert_allclose(np.abs(z), np.abs(reference.transform(x[:10])), rtol=1e-2, atol=1e-2)


def test_basis_errors():
    with pytest.raises(LprError, match=r"cluster.latent_dim=9 should be ≤ the hidden size 4"):
        fit_basis([torch.zeros(10, 4)], 9)
    bad = torch.zeros(10, 4)
    bad[3, 1] = float("inf")
    with pytest.raises(LprError, match=r"1 rows of the states contain NaN or Inf"):
        fit_basis([bad], 2)


def test_matching_recovers_a_planted_permutation():
    rng = np.random.default_rng(1)
    experts, n = 8, 4000
    permutation = rng.permutation(experts)
    clusters = np.stack([rng.integers(0, experts, n), rng.integers(0, experts, n)], 1)
    clusters[:, 1] = (clusters[:, 0] + 1 + rng.integers(0, experts - 1, n)) % experts
    teacher = permutation[clusters]
    noisy = teacher.copy()
    flip = rng.random(n) < 0.2
    noisy[flip, 1] = (noisy[flip, 0] + 3) % experts
    expert_of_cluster, stats = match_clusters(clusters, noisy, experts)
    np.testing.assert_array_equal(expert_of_cluster, permutation)
    assert 0.85 < stats["matched_share"] < 0.95
    assert stats["chance_share"] == pytest.approx(2 * 2 / 8 / 2)
    _, perfect = match_clusters(clusters, teacher, experts)
    assert perfect["matched_share"] == 1.0


def test_wide_basis_equals_sklearn_pca():
    """A hidden size where only the top eigenpairs are computed (Lanczos), as at production widths."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(3000, 300)) * np.linspace(3.0, 0.1, 300) + 1.0).astype(np.float32)
    basis = fit_basis((torch.from_numpy(x[i : i + 1000]) for i in range(0, 3000, 1000)), 8)
    reference = PCA(n_components=8, svd_solver="full").fit(x)
    np.testing.assert_allclose(basis.explained_variance, reference.explained_variance_, rtol=1e-3)
    np.testing.assert_allclose(np.abs(basis.components @ reference.components_.T), np.eye(8), atol=1e-3)
    assert basis.variance_kept == pytest.approx(reference.explained_variance_ratio_.sum(), rel=1e-4)
