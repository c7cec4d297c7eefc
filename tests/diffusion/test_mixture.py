"""Gaussian mixtures, quadratic rewards and closed-form tilts, checked against torch.distributions, autograd,
Monte Carlo and numerical quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from sqdf.diffusion.mixture import GaussianMixture, QuadraticReward, tilt_mixture
from sqdf.errors import ConfigError


def _random_spd(k, d, g, scale=0.5, floor=0.2):
    m = torch.randn(k, d, d, generator=g, dtype=torch.float64) * scale
    return m @ m.transpose(-1, -2) + floor * torch.eye(d, dtype=torch.float64)


def _random_mixture(seed=0, k=3, d=2, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * spread
    covs = _random_spd(k, d, g)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(means, covs, weights), g


def _torch_mixture(m: GaussianMixture) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(probs=m.weights), MultivariateNormal(m.means, covariance_matrix=m.covs))


# ---- GaussianMixture -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,k,d", [(0, 3, 2), (1, 4, 3), (2, 1, 1)])
def test_log_prob_matches_torch_mixture(seed, k, d):
    mix, g = _random_mixture(seed, k, d)
    x = torch.randn(50, d, generator=g, dtype=torch.float64) * 3
    torch.testing.assert_close(mix.log_prob(x), _torch_mixture(mix).log_prob(x))
    # float32 input gives float32 output with the same values
    out32 = mix.log_prob(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, _torch_mixture(mix).log_prob(x).float(), rtol=1e-5, atol=1e-5)


def test_weights_are_normalized_and_responsibilities_sum_to_one():
    mix = GaussianMixture.isotropic([[0.0, 0.0], [3.0, 0.0]], 0.5, weights=[2.0, 6.0])
    torch.testing.assert_close(mix.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.5, 0.0]], dtype=torch.float64)
    resp = mix.responsibilities(x)
    torch.testing.assert_close(resp.sum(1), torch.ones(3, dtype=torch.float64))
    # at the midpoint the likelihoods are equal, so responsibilities equal the weights
    torch.testing.assert_close(resp[2], mix.weights)


@pytest.mark.parametrize("seed,k,d", [(0, 3, 2), (5, 4, 3)])
def test_score_matches_autograd(seed, k, d):
    mix, g = _random_mixture(seed, k, d)
    x = (torch.randn(40, d, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    (grad,) = torch.autograd.grad(_torch_mixture(mix).log_prob(x).sum(), x)
    torch.testing.assert_close(mix.score(x.detach()), grad)


def test_noised_moments_match_monte_carlo():
    mix, _ = _random_mixture(3, k=3, d=2)
    abar = 0.4
    g = torch.Generator().manual_seed(42)
    n = 200_000
    x0 = mix.sample(n, g)
    xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    noised = mix.noised(abar)
    # analytic moments of the noised mixture object
    mean = (noised.weights[:, None] * noised.means).sum(0)
    second = (noised.weights[:, None, None] * (noised.covs + noised.means[:, :, None] * noised.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    emp_mean = xt.mean(0)
    emp_cov = torch.cov(xt.T)
    se = (torch.diagonal(cov) / n).sqrt()
    assert bool(((emp_mean - mean).abs() < 5 * se).all()), (emp_mean, mean)
    torch.testing.assert_close(emp_cov, cov, rtol=0.03, atol=0.03)


def test_noised_density_matches_1d_convolution_quadrature():
    """p_t(y) = ∫ p_0(x) N(y; sqrt(a) x, 1 - a) dx for a 1-D mixture, by quadrature on a fine grid."""
    mix = GaussianMixture(torch.tensor([[-2.0], [1.0], [3.5]]), torch.tensor([[[0.3]], [[1.2]], [[0.05]]]),
                          torch.tensor([0.2, 0.5, 0.3]))
    abar = 0.6
    xs = torch.linspace(-10, 10, 40001, dtype=torch.float64)
    h = float(xs[1] - xs[0])
    p0 = mix.log_prob(xs[:, None]).exp()
    ys = torch.linspace(-4, 4, 17, dtype=torch.float64)
    kern = torch.exp(-((ys[:, None] - math.sqrt(abar) * xs[None]) ** 2) / (2 * (1 - abar)))
    kern = kern / math.sqrt(2 * math.pi * (1 - abar))
    pt = (kern * p0[None]).sum(1) * h
    torch.testing.assert_close(mix.noised(abar).log_prob(ys[:, None]), pt.log(), rtol=1e-6, atol=1e-6)


def test_noised_score_matches_autograd_and_limits():
    mix, g = _random_mixture(4, k=3, d=2)
    noised = mix.noised(0.3)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(_torch_mixture(noised).log_prob(x).sum(), x)
    torch.testing.assert_close(noised.score(x.detach()), grad)
    # abar = 1 is the mixture itself; abar -> 0 is N(0, I)
    torch.testing.assert_close(mix.noised(1.0).log_prob(x.detach()), mix.log_prob(x.detach()))
    std_normal = -0.5 * (x.detach() ** 2).sum(1) - math.log(2 * math.pi)
    torch.testing.assert_close(mix.noised(1e-12).log_prob(x.detach()), std_normal, rtol=1e-5, atol=1e-5)


def test_sample_moments():
    mix = GaussianMixture.isotropic([[-4.0, 0.0], [4.0, 1.0]], 0.3, weights=[1.0, 3.0])
    x = mix.sample(100_000, torch.Generator().manual_seed(0))
    assert x.shape == (100_000, 2) and x.dtype == torch.float64
    torch.testing.assert_close(x.mean(0), torch.tensor([2.0, 0.75], dtype=torch.float64), rtol=0, atol=0.03)
    # fraction near the right mode
    assert float((x[:, 0] > 0).double().mean()) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(means=torch.zeros(2), covs=torch.eye(2)[None], weights=torch.ones(1)),  # means not [K, d]
        dict(means=torch.zeros(1, 2), covs=torch.eye(3)[None], weights=torch.ones(1)),  # covs wrong shape
        dict(means=torch.zeros(2, 2), covs=torch.eye(2).expand(2, 2, 2), weights=torch.tensor([1.0, -1.0])),
        dict(means=torch.zeros(1, 2), covs=-torch.eye(2)[None], weights=torch.ones(1)),  # not SPD
        dict(means=torch.zeros(2, 2), covs=torch.eye(2).expand(2, 2, 2), weights=torch.zeros(2)),
    ],
)
def test_mixture_rejects_bad_parameters(kwargs):
    with pytest.raises(ConfigError):
        GaussianMixture(**kwargs)


# ---- QuadraticReward -----------------------------------------------------------------------------------------


def test_quadratic_reward_linear_form():
    w = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    r = QuadraticReward.linear(w)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(r(x), x @ w)


def test_quadratic_reward_diagonal_form():
    a = torch.tensor([2.0, 0.2], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    r = QuadraticReward.diagonal(a, b, offset=0.7)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = -0.5 * (a * (x - b) ** 2).sum(1) + 0.7
    torch.testing.assert_close(r(x), expected)
    # gmm2's reward: -x1^2 - (x2-1)^2/10
    torch.testing.assert_close(QuadraticReward.diagonal([2.0, 0.2], [0.0, 1.0])(x), -x[:, 0] ** 2 - (x[:, 1] - 1) ** 2 / 10)


def test_quadratic_reward_general_nonsymmetric_A_and_autograd():
    A = torch.tensor([[1.0, 0.8], [-0.2, 0.5]], dtype=torch.float64)
    w = torch.tensor([0.3, -1.0], dtype=torch.float64)
    r = QuadraticReward(A, w, c=1.5)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_(True)
    expected = -0.5 * torch.einsum("bi,ij,bj->b", x, A, x) + x @ w + 1.5
    torch.testing.assert_close(r(x), expected)
    (grad,) = torch.autograd.grad(r(x).sum(), x)
    torch.testing.assert_close(grad, -x.detach() @ (0.5 * (A + A.T)) + w)
    # float32 input works and stays float32
    assert r(x.detach().float()).dtype == torch.float32


def test_quadratic_reward_expectation_vs_monte_carlo():
    g = torch.Generator().manual_seed(3)
    d = 3
    A = _random_spd(1, d, g)[0] - 0.3 * torch.eye(d, dtype=torch.float64)  # possibly indefinite, fine here
    w = torch.randn(d, generator=g, dtype=torch.float64)
    r = QuadraticReward(A, w, c=-0.4)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    cov = _random_spd(1, d, g)[0]
    n = 400_000
    x = mean + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    vals = r(x)
    mc, se = float(vals.mean()), float(vals.std() / math.sqrt(n))
    assert float(r.expectation(mean, cov)) == pytest.approx(mc, abs=5 * se)
    # batched form
    means = torch.stack([mean, -mean])
    covs = torch.stack([cov, 2 * cov])
    out = r.expectation(means, covs)
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(float(r.expectation(mean, cov)))


# ---- tilt_mixture --------------------------------------------------------------------------------------------


def _gmm1():
    means = [[a, b] for a in (-4.0, 0.0, 4.0) for b in (-4.0, 0.0, 4.0)]
    base = GaussianMixture.isotropic(means, 0.3)
    reward = QuadraticReward.diagonal([2 / 100, 2.0], [0.0, 0.0])  # -x1^2/100 - x2^2
    return base, reward


CENTER, LEFT, RIGHT = 4, 1, 7  # indices of (0,0), (-4,0), (4,0) in the row-major grid


def test_tilt_gmm1_benchmark_numbers():
    base, reward = _gmm1()
    t = tilt_mixture(base, reward, 1.0)
    assert t.optimum == pytest.approx(-1.440, abs=5e-4)
    assert t.optimum == pytest.approx(t.log_z)  # alpha = 1
    assert t.reward_mean == pytest.approx(-0.2906, abs=3e-4)
    assert t.kl == pytest.approx(1.149, abs=5e-4)
    w = t.target.weights
    assert float(w[CENTER]) == pytest.approx(0.370, abs=1e-3)
    assert float(w[LEFT]) == pytest.approx(0.315, abs=1e-3)
    assert float(w[RIGHT]) == pytest.approx(0.315, abs=1e-3)
    others = [i for i in range(9) if i not in (CENTER, LEFT, RIGHT)]
    assert float(w[others].sum()) < 1e-3
    # E_ref[r] = -11.08
    e_ref = float((base.weights * reward.expectation(base.means, base.covs)).sum())
    assert e_ref == pytest.approx(-11.08, abs=5e-3)


@pytest.mark.parametrize("alpha,r_mean,kl,w_center", [(0.3, -0.186, 1.355, 0.46), (0.1, -0.089, 1.940, 0.69)])
def test_tilt_gmm1_other_alphas(alpha, r_mean, kl, w_center):
    base, reward = _gmm1()
    t = tilt_mixture(base, reward, alpha)
    assert t.reward_mean == pytest.approx(r_mean, abs=1e-3)
    assert t.kl == pytest.approx(kl, abs=3e-3)
    assert float(t.target.weights[CENTER]) == pytest.approx(w_center, abs=5e-3)
    assert t.optimum == pytest.approx(alpha * t.log_z)
    assert t.optimum == pytest.approx(t.reward_mean - alpha * t.kl)


@pytest.mark.parametrize("m,s,w,alpha", [(0.0, 1.0, 1.0, 1.0), (1.5, 0.7, -2.0, 0.5), (-3.0, 2.0, 0.3, 4.0)])
def test_tilt_1d_gaussian_linear_reward_closed_form(m, s, w, alpha):
    base = GaussianMixture(torch.tensor([[m]], dtype=torch.float64), torch.tensor([[[s * s]]], dtype=torch.float64),
                           torch.ones(1))
    t = tilt_mixture(base, QuadraticReward.linear([w]), alpha)
    assert t.optimum == pytest.approx(w * m + s**2 * w**2 / (2 * alpha), rel=1e-10)
    assert float(t.target.means[0, 0]) == pytest.approx(m + s**2 * w / alpha, rel=1e-10)
    assert float(t.target.covs[0, 0, 0]) == pytest.approx(s**2, rel=1e-10)
    assert t.reward_mean == pytest.approx(w * (m + s**2 * w / alpha), rel=1e-10)
    assert t.kl == pytest.approx(s**2 * w**2 / (2 * alpha**2), rel=1e-9)


def test_tilt_log_z_and_target_against_2d_quadrature():
    mix, g = _random_mixture(21, k=3, d=2, spread=1.5)
    # a random concave-ish quadratic reward with an off-diagonal term
    A = _random_spd(1, 2, g, scale=0.4, floor=0.05)[0]
    w = torch.randn(2, generator=g, dtype=torch.float64)
    reward = QuadraticReward(A, w, c=0.3)
    alpha = 0.8
    t = tilt_mixture(mix, reward, alpha)

    L, n = 12.0, 1201
    grid = torch.linspace(-L, L, n, dtype=torch.float64)
    h = float(grid[1] - grid[0])
    X, Y = torch.meshgrid(grid, grid, indexing="ij")
    x = torch.stack([X.flatten(), Y.flatten()], 1)
    logp = _torch_mixture(mix).log_prob(x)
    r = -0.5 * torch.einsum("bi,ij,bj->b", x, A, x) + x @ w + 0.3
    lw = logp + r / alpha
    log_z = float(torch.logsumexp(lw, 0)) + 2 * math.log(h)
    assert t.log_z == pytest.approx(log_z, abs=1e-8)
    assert t.optimum == pytest.approx(alpha * log_z, abs=1e-8)
    p_star = torch.exp(lw - torch.logsumexp(lw, 0))
    r_mean = float((p_star * r).sum())
    assert t.reward_mean == pytest.approx(r_mean, abs=1e-7)
    assert t.kl == pytest.approx((r_mean - alpha * log_z) / alpha, abs=1e-7)
    # the target mixture's density equals p_ref exp(r/alpha) / Z pointwise
    idx = torch.randint(0, x.shape[0], (50,), generator=g)
    torch.testing.assert_close(t.target.log_prob(x[idx]), lw[idx] - log_z, rtol=1e-8, atol=1e-8)


def test_tilt_too_convex_reward_raises():
    base = GaussianMixture.isotropic([[0.0, 0.0]], 1.0)
    convex = QuadraticReward(-2.0 * torch.eye(2, dtype=torch.float64), torch.zeros(2))  # r = +||x||^2
    with pytest.raises(ConfigError):
        tilt_mixture(base, convex, 1.0)
    # a large enough alpha makes it integrable: precision 1 - 2/alpha > 0
    t = tilt_mixture(base, convex, 4.0)
    torch.testing.assert_close(t.target.covs[0], 2.0 * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_tilt_rejects_nonpositive_alpha(alpha):
    base, reward = _gmm1()
    with pytest.raises(ConfigError):
        tilt_mixture(base, reward, alpha)
