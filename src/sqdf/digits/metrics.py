"""Naturalness and diversity of digit samples in the classifier's feature space (pure functions).

frechet_distance: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}) between the Gaussians fitted
to two feature sets [n, d] (the FID formula). mean_pairwise_distance: average Euclidean distance over distinct pairs.
"""

from __future__ import annotations

import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def gaussian_frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b), float64."""
    mu_a, mu_b, cov_a, cov_b = (t.to(torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh((root_a @ cov_b @ root_a + (root_a @ cov_b @ root_a).T) / 2).clamp(min=0).sqrt()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross.sum())


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to features [n_a, d] and [n_b, d]."""
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError(f"Frechet distance needs >= 2 samples per set, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    a, b = feats_a.to(torch.float64), feats_b.to(torch.float64)
    return gaussian_frechet(a.mean(0), torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
                            b.mean(0), torch.cov(b.T).reshape(b.shape[1], b.shape[1]))


def mean_pairwise_distance(feats: torch.Tensor, max_points: int = 1024) -> float:
    """Mean Euclidean distance over distinct pairs of the first max_points rows of feats [n, d] (flattened)."""
    f = feats.flatten(1).to(torch.float64)[:max_points]
    n = f.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))
