"""The exact soft value V*(x, t) = alpha log E_ref[exp(r(x0)/alpha) | x_t = x] against closed forms and quadrature."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.diffusion.mixture import GaussianMixture, QuadraticReward, tilt_mixture
from sqdf.diffusion.soft_value import exact_soft_value, mixture_posterior, monte_carlo_soft_value
from sqdf.errors import ConfigError

ALPHA = 0.7


def _quadrature_soft_value(base: GaussianMixture, reward, alpha, x, s, n):
    """alpha log ∫ p_ref(x0) N(x; s x0, n^2) exp(r(x0)/alpha) dx0 - alpha log p_t(x), 1-D, on a fine grid."""
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    dx = float(grid[1] - grid[0])
    log_prior = base.log_prob(grid[:, None])
    lik = -0.5 * ((x[:, None] - s * grid[None]) / n) ** 2 - math.log(n * math.sqrt(2 * math.pi))  # [B, G]
    joint = log_prior[None] + lik + reward(grid[:, None])[None] / alpha
    log_num = torch.logsumexp(joint, dim=1) + math.log(dx)
    return alpha * (log_num - base.noised_at(s, n).log_prob(x[:, None]))


def test_gaussian_base_quadratic_reward_matches_the_closed_form():
    # base N(m, v), r(x) = -a/2 (x - c)^2; posterior N(M, C) with C = 1/(1/v + s^2/n^2), M = C (m/v + s x/n^2);
    # E[exp(r/alpha) | x] = (1 + a C/alpha)^-1/2 exp(-(a/alpha)(M - c)^2 / (2 (1 + a C/alpha)))
    m, v, a, c = 0.5, 1.5, 2.0, -1.0
    base = GaussianMixture([[m]], [[[v]]], [1.0])
    reward = QuadraticReward.diagonal([a], [c])
    tilt = tilt_mixture(base, reward, ALPHA)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for s, n in ((0.9, math.sqrt(1 - 0.81)), (0.3, math.sqrt(1 - 0.09)), (1.0, 0.0)):
        if n > 0:
            C = 1 / (1 / v + s * s / (n * n))
            M = C * (m / v + s * x / (n * n))
        else:
            C, M = 0.0, x / s
        g = 1 + a * C / ALPHA
        exact = ALPHA * (-0.5 * math.log(g) - (a / ALPHA) * (M - c) ** 2 / (2 * g))
        got = exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x[:, None], s, n)
        torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9)
    # far from the data the soft value tends to the soft value of the prior: J* = alpha log Z at noise -> all
    prior_limit = exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x[:, None], 1e-6, 1.0)
    torch.testing.assert_close(prior_limit, torch.full_like(x, tilt.optimum), rtol=0, atol=1e-5)


def test_mixture_with_quadratic_reward_matches_quadrature():
    base = GaussianMixture([[-2.0], [1.5]], [[[0.3]], [[0.8]]], [0.3, 0.7])
    reward = QuadraticReward.diagonal([0.5], [1.0])
    tilt = tilt_mixture(base, reward, ALPHA)
    x = torch.linspace(-3, 3, 9, dtype=torch.float64)
    for abar in (0.9, 0.4, 0.05):
        s, n = math.sqrt(abar), math.sqrt(1 - abar)
        got = exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x[:, None], s, n)
        torch.testing.assert_close(got, _quadrature_soft_value(base, reward, ALPHA, x, s, n), rtol=0, atol=1e-7)


def test_monte_carlo_value_of_a_nonquadratic_reward_converges_to_quadrature():
    base = GaussianMixture([[-2.0], [1.5]], [[[0.3]], [[0.8]]], [0.3, 0.7])

    def reward(x, cond=None):
        return torch.sin(2 * x[:, 0]) - 0.1 * x[:, 0] ** 2

    x = torch.linspace(-3, 3, 9, dtype=torch.float64)
    s, n = math.sqrt(0.5), math.sqrt(0.5)
    exact = _quadrature_soft_value(base, reward, ALPHA, x, s, n)
    errors = []
    for m in (4, 64, 4096):
        got = monte_carlo_soft_value(base, reward, ALPHA, x[:, None], s, n, m, torch.Generator().manual_seed(m))
        errors.append(float((got - exact).abs().max()))
    assert errors[-1] < 0.02 and errors[0] > errors[-1]  # the Jensen gap and the noise shrink as M grows
    # and it agrees with the closed form where both exist
    quad = QuadraticReward.diagonal([0.5], [1.0])
    tilt = tilt_mixture(base, quad, ALPHA)
    mc = monte_carlo_soft_value(base, quad, ALPHA, x[:, None], s, n, 8192, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x[:, None], s, n),
                               rtol=0, atol=0.03)


def test_posterior_is_normalized_and_centred_by_bayes():
    base = GaussianMixture([[-2.0, 0.0], [1.5, 1.0]], torch.stack([torch.eye(2) * 0.3, torch.eye(2) * 0.8]),
                           [0.3, 0.7])
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    log_w, means, chol = mixture_posterior(base, x, 0.6, 0.8)
    torch.testing.assert_close(log_w.exp().sum(1), torch.ones(5, dtype=torch.float64))
    # component 0 in closed form: C = (S^-1 + s^2/n^2)^-1 I, M = C (S^-1 m + s x / n^2)
    c0 = 1 / (1 / 0.3 + 0.36 / 0.64)
    torch.testing.assert_close(chol[0] @ chol[0].T, c0 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(means[:, 0], c0 * (base.means[0] / 0.3 + 0.6 * x / 0.64))
    with pytest.raises(ConfigError, match="point mass"):
        mixture_posterior(base, x, 1.0, 0.0)


def test_soft_value_gradient_matches_finite_differences():
    base = GaussianMixture([[-2.0, 0.0], [1.5, 1.0]], torch.stack([torch.eye(2) * 0.3, torch.eye(2) * 0.8]),
                           [0.3, 0.7])
    tilt = tilt_mixture(base, QuadraticReward.diagonal([0.1, 1.0], [0.0, 0.5]), ALPHA)
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    v = exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x, 0.7, math.sqrt(0.51))
    (grad,) = torch.autograd.grad(v.sum(), x)
    h = 1e-6
    for i in range(2):
        e = torch.zeros_like(x)
        e[:, i] = h
        fd = (exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x.detach() + e, 0.7, math.sqrt(0.51))
              - exact_soft_value(base, tilt.target, tilt.log_z, ALPHA, x.detach() - e, 0.7, math.sqrt(0.51))) / (2 * h)
        torch.testing.assert_close(grad[:, i], fd, rtol=1e-6, atol=1e-8)
