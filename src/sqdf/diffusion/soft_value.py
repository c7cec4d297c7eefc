"""The exact soft value of a Gaussian-mixture base model (pure math, float64; differentiable in x).

For a base p_ref (a Gaussian mixture) noised as x_t = s x_0 + n eps (VP: s = sqrt(abar), n = sqrt(1 - abar); flow:
s = 1 - t, n = t), a reward r and a KL weight alpha, the soft value of a state is

    V*(x, t) = alpha log E_ref[exp(r(x_0) / alpha) | x_t = x].

It is the value of the KL-regularized objective from x on under the optimal policy, and the exact soft Q of a
sampler step is the soft value of the state the step lands in: Q*(x_k, x_{k+1}) = V*(x_{k+1}, t_{k+1}).

Two ways to compute it:

* ``exact_soft_value``: with the tilted target p* ∝ p_ref exp(r / alpha) known as a mixture (quadratic rewards,
  density-ratio rewards) and log Z = log E_ref[exp(r / alpha)], Bayes gives
  E_ref[exp(r/alpha) | x_t] = Z p*_t(x) / p_t(x), so V* = alpha (log Z + log p*_t(x) - log p_t(x)) with both noised
  marginals again mixtures. Closed form.
* ``monte_carlo_soft_value``: for any reward, the posterior p_ref(x_0 | x_t) is itself a mixture, with weights
  pi_k(x) ∝ w_k N(x; s m_k, s^2 S_k + n^2 I) and components N(M_k(x), C_k), C_k = (S_k^-1 + s^2/n^2 I)^-1,
  M_k(x) = C_k (S_k^-1 m_k + s x / n^2). Then E[exp(r/alpha) | x] = sum_k pi_k(x) E_{N(M_k, C_k)}[exp(r/alpha)] with
  M reparameterized draws per component (the estimate is biased low by Jensen for finite M, exact as M grows).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ConfigError
from .mixture import GaussianMixture


def _check_level(signal, noise) -> None:
    s, n = torch.as_tensor(signal, dtype=torch.float64), torch.as_tensor(noise, dtype=torch.float64)
    if not (bool((s > 0).all()) and bool((n >= 0).all()) and bool(torch.isfinite(s).all())
            and bool(torch.isfinite(n).all())):
        raise ConfigError(f"noise levels must have signal > 0 and noise >= 0 (got signal {float(s.min()):.3g}.., "
                          f"noise {float(n.min()):.3g}..)")


def exact_soft_value(base: GaussianMixture, target: GaussianMixture, log_z: float, alpha: float, x: torch.Tensor,
                     signal, noise) -> torch.Tensor:
    """V*(x, t) [B] for states x [B, d] at the level (signal, noise) (numbers, or [B] tensors: one level per
    sample), given the tilted target mixture p* and log Z = log E_ref[exp(r/alpha)]. At noise 0 it equals
    r(x / signal)."""
    _check_level(signal, noise)
    s = torch.as_tensor(signal, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    n = torch.as_tensor(noise, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    v = log_z + target.noised_log_prob(x, s, n) - base.noised_log_prob(x, s, n)
    return (alpha * v).to(x.dtype)


def mixture_posterior(base: GaussianMixture, x: torch.Tensor, signal: float,
                      noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_ref(x_0 | x_t = x) as a mixture: (log weights [B, K], means [B, K, d], Cholesky factors of the
    covariances [K, d, d]), for x [B, d] at noise > 0. Differentiable in x."""
    _check_level(signal, noise)
    if noise <= 0:
        raise ConfigError("the posterior of a noise-free state is a point mass; use noise > 0")
    s, n = float(signal), float(noise)
    x64 = x.flatten(1).to(torch.float64)
    d = base.dim
    eye = torch.eye(d, dtype=torch.float64, device=x64.device)
    prec = torch.linalg.inv(base.covs.to(x64.device))  # [K, d, d]
    post_cov = torch.linalg.inv(prec + (s * s / (n * n)) * eye)  # [K, d, d]
    post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
    prior_term = torch.einsum("kij,kj->ki", prec, base.means.to(x64.device))  # [K, d]
    h = prior_term[None] + (s / (n * n)) * x64[:, None, :]  # [B, K, d]
    means = torch.einsum("kij,bkj->bki", post_cov, h)
    log_w = torch.log_softmax(base.noised_at(s, n).component_log_probs(x64), dim=1)
    return log_w, means, torch.linalg.cholesky(post_cov)


def monte_carlo_soft_value(base: GaussianMixture, reward: Callable, alpha: float, x: torch.Tensor, signal: float,
                           noise: float, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """alpha log sum_k pi_k(x) mean_j exp(r(x0_kj) / alpha), x0_kj = M_k(x) + L_k z_j: V*(x, t) [B] by
    ``num_samples`` reparameterized posterior draws per component (the same z_j for every state and component).
    Costs B K num_samples reward calls. At noise 0 the posterior is a point mass and V* = r(x / signal)."""
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be >= 1")
    if noise <= 0:
        _check_level(signal, noise)
        return reward(x / signal, None)
    log_w, means, chol = mixture_posterior(base, x, signal, noise)
    b, k, d = means.shape
    z = torch.randn(num_samples, d, dtype=torch.float64, generator=generator).to(means.device)
    draws = means[:, :, None, :] + torch.einsum("kij,mj->kmi", chol, z)[None]  # [B, K, M, d]
    r = reward(draws.reshape(-1, d).to(x.dtype), None).to(torch.float64).reshape(b, k, num_samples)
    inner = torch.logsumexp(r / alpha, dim=2) - math.log(num_samples)  # log mean_j exp(r/alpha), [B, K]
    return (alpha * torch.logsumexp(log_w + inner, dim=1)).to(x.dtype)
