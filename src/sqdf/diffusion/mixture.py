"""Gaussian mixtures and their closed-form tilts by quadratic rewards (pure math, float64).

A mixture holds ``means`` [K, d], ``covs`` [K, d, d] and ``weights`` [K] (summing to 1). Under the VP forward
process the noised mixture at level ``abar`` is again a mixture with means ``sqrt(abar) m_k`` and covariances
``abar S_k + (1 - abar) I``; its score is analytic, which gives exact-score base models with no training.
A quadratic reward ``r(x) = -1/2 x^T A x + w^T x + c`` tilts each component ``N(m, S)`` by ``exp(r / alpha)``
into another Gaussian, so the optimum of the KL-regularized objective is known in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class GaussianMixture:
    """A K-component Gaussian mixture in d dimensions. Shapes: means [K, d], covs [K, d, d], weights [K]."""

    means: torch.Tensor
    covs: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ConfigError(f"mixture means must have shape [K, d], got {tuple(self.means.shape)}")
        k, d = self.means.shape
        if self.covs.shape != (k, d, d):
            raise ConfigError(f"mixture covs must have shape [{k}, {d}, {d}], got {tuple(self.covs.shape)}")
        if self.weights.shape != (k,) or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ConfigError(f"mixture weights must be {k} non-negative numbers, got {self.weights.tolist()}")
        self.weights = self.weights / self.weights.sum()
        try:
            torch.linalg.cholesky(self.covs)
        except RuntimeError as exc:
            raise ConfigError("mixture covariances must be symmetric positive definite") from exc

    @classmethod
    def isotropic(cls, means, variance: float, weights=None) -> "GaussianMixture":
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        covs = variance * torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return cls(means, covs, w)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def noised(self, abar: float | torch.Tensor) -> "GaussianMixture":
        """The marginal of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps when x_0 follows this mixture."""
        a = torch.as_tensor(abar, dtype=torch.float64)
        return self.noised_at(a.sqrt(), (1 - a).sqrt())

    def noised_at(self, signal: float | torch.Tensor, noise: float | torch.Tensor) -> "GaussianMixture":
        """The law of x_t = signal x_0 + noise eps (any schedule: VP, flow): means s m_k, covs s^2 S_k + n^2 I."""
        s = torch.as_tensor(signal, dtype=torch.float64)
        n = torch.as_tensor(noise, dtype=torch.float64)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(s * self.means, s * s * self.covs + n * n * eye, self.weights.clone())

    def noised_log_prob(self, x: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """log p_t(x_b) [B] with each sample at its own level (signal [B], noise [B]): the components
        N(s_b m_k, s_b^2 S_k + n_b^2 I), batched over samples and components. Differentiable in x."""
        x64 = x.flatten(1).to(torch.float64)
        s = torch.as_tensor(signal, dtype=torch.float64, device=x64.device).reshape(-1, 1, 1)
        n = torch.as_tensor(noise, dtype=torch.float64, device=x64.device).reshape(-1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64, device=x64.device)
        means = s * self.means.to(x64.device)[None]  # [B, K, d]
        covs = (s * s)[..., None] * self.covs.to(x64.device)[None] + (n * n)[..., None] * eye  # [B, K, d, d]
        return torch.logsumexp(_component_log_probs(x64, means, covs, self.weights), dim=1)

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; m_k, S_k) for x [B, d]; returns [B, K] in x's dtype."""
        return _component_log_probs(x, self.means, self.covs, self.weights)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density at x [B, d]; returns [B]."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities p(k | x), [B, K]."""
        return torch.softmax(self.component_log_probs(x), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x) for x [B, d]; returns [B, d]."""
        return _mixture_score(x, self.means, self.covs, self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, [n, d] float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)


def _component_log_probs(x, means, covs, weights) -> torch.Tensor:
    """log w_k + log N(x_b; m_k, S_k), [B, K], for means [K, d] and covs [K, d, d] shared by the batch, or
    per-sample [B, K, d] and [B, K, d, d]."""
    dt = x.dtype
    x64 = x.to(torch.float64)
    d = means.shape[-1]
    chol = torch.linalg.cholesky(covs.to(x64.device))  # [(B,) K, d, d]
    diff = x64[:, None, :] - means.to(x64.device)  # [B, K, d]
    chol = chol.expand(x64.shape[0], *chol.shape[-3:])
    sol = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)
    maha = (sol[..., 0] ** 2).sum(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    out = torch.log(weights.to(x64.device))[None] - 0.5 * (maha + logdet + d * math.log(2 * math.pi))
    return out.to(dt)


def _mixture_score(x, means, covs, weights) -> torch.Tensor:
    dt = x.dtype
    x64 = x.to(torch.float64)
    means, covs, weights = means.to(x64.device), covs.to(x64.device), weights.to(x64.device)
    resp = torch.softmax(_component_log_probs(x64, means, covs, weights), dim=1)  # [B, K]
    prec = torch.linalg.inv(covs)  # [K, d, d]
    diff = means[None] - x64[:, None, :]  # [B, K, d]
    comp_scores = torch.einsum("kij,bkj->bki", prec, diff)
    return (resp[..., None] * comp_scores).sum(1).to(dt)


@dataclass
class QuadraticReward:
    """r(x) = -1/2 x^T A x + w^T x + c, differentiable. Shapes: A [d, d] (symmetric), w [d]."""

    A: torch.Tensor
    w: torch.Tensor
    c: float = 0.0

    def __post_init__(self) -> None:
        self.A = torch.as_tensor(self.A, dtype=torch.float64)
        self.w = torch.as_tensor(self.w, dtype=torch.float64)
        self.A = 0.5 * (self.A + self.A.T)

    @classmethod
    def linear(cls, w) -> "QuadraticReward":
        w = torch.as_tensor(w, dtype=torch.float64)
        return cls(torch.zeros(len(w), len(w), dtype=torch.float64), w, 0.0)

    @classmethod
    def diagonal(cls, curvature, center, offset: float = 0.0) -> "QuadraticReward":
        """r(x) = -1/2 sum_i curvature_i (x_i - center_i)^2 + offset."""
        a = torch.as_tensor(curvature, dtype=torch.float64)
        b = torch.as_tensor(center, dtype=torch.float64)
        return cls(torch.diag(a), a * b, offset - 0.5 * float((a * b * b).sum()))

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        A, w = self.A.to(x.device, x.dtype), self.w.to(x.device, x.dtype)
        x = x.flatten(1)
        return -0.5 * torch.einsum("bi,ij,bj->b", x, A, x) + x @ w + self.c

    def expectation(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """E[r(x)] under N(mean, cov); batched over leading dims of mean [..., d], cov [..., d, d]."""
        quad = torch.einsum("...i,ij,...j->...", mean, self.A, mean)
        tr = torch.einsum("ij,...ji->...", self.A, cov)
        return -0.5 * (quad + tr) + mean @ self.w + self.c


@dataclass
class TiltedMixture:
    """The optimum p*(x) ∝ p_ref(x) exp(r(x)/alpha) for a mixture p_ref and quadratic r, in closed form.

    ``target`` is the tilted mixture; ``log_z`` = log E_ref[exp(r/alpha)]; ``optimum`` J* = alpha * log_z;
    ``reward_mean`` E_{p*}[r]; ``kl`` KL(p* || p_ref) = (E_{p*}[r] - J*) / alpha.
    """

    target: GaussianMixture
    log_z: float
    optimum: float
    reward_mean: float
    kl: float


def tilt_mixture(base: GaussianMixture, reward: QuadraticReward, alpha: float) -> TiltedMixture:
    """Tilt each component N(m, S) by exp(r/alpha): precision P' = S^-1 + A/alpha, mean m' = P'^-1 (S^-1 m + w/alpha),
    log Z_k = log ∫ N(x; m, S) exp(r(x)/alpha) dx in closed form; weights w'_k ∝ w_k Z_k."""
    if alpha <= 0:
        raise ConfigError(f"alpha={alpha} must be > 0")
    A, w, c = reward.A / alpha, reward.w / alpha, reward.c / alpha
    prec = torch.linalg.inv(base.covs)  # [K, d, d]
    new_prec = prec + A[None]
    try:
        torch.linalg.cholesky(new_prec)
    except RuntimeError as exc:
        raise ConfigError(
            f"reward/alpha={alpha} is too convex: exp(r/alpha) times the base is not integrable; raise alpha"
        ) from exc
    new_cov = torch.linalg.inv(new_prec)
    h = torch.einsum("kij,kj->ki", prec, base.means) + w[None]
    new_mean = torch.einsum("kij,kj->ki", new_cov, h)
    # log Z_k = -1/2 m^T P m + 1/2 h^T S' h + 1/2 log det S' - 1/2 log det S + c
    quad_old = torch.einsum("ki,kij,kj->k", base.means, prec, base.means)
    quad_new = torch.einsum("ki,kij,kj->k", h, new_cov, h)
    logdet_new = torch.logdet(new_cov)
    logdet_old = torch.logdet(base.covs)
    log_zk = -0.5 * quad_old + 0.5 * quad_new + 0.5 * (logdet_new - logdet_old) + c
    log_wz = torch.log(base.weights) + log_zk
    log_z = torch.logsumexp(log_wz, 0)
    new_weights = torch.exp(log_wz - log_z)
    target = GaussianMixture(new_mean, 0.5 * (new_cov + new_cov.transpose(-1, -2)), new_weights)
    reward_mean = float((new_weights * reward.expectation(new_mean, new_cov)).sum())
    optimum = float(alpha * log_z)
    return TiltedMixture(target, float(log_z), optimum, reward_mean, (reward_mean - optimum) / alpha)
