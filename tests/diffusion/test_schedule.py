"""Schedule math: betas, abar, timestep grids, prediction conversions, DDIM steps and Gaussian helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sqdf.diffusion.schedule import (
    FlowMatchSchedule,
    NoiseSchedule,
    ScheduleConfig,
    alphas_cumprod_from_betas,
    cosine_betas,
    ddim_mean,
    ddim_sigma,
    ddim_sigma_coeffs,
    gaussian_kl,
    gaussian_log_prob,
    linear_betas,
    prediction_to_eps_and_x0,
    shift_flow_time,
    spaced_timesteps,
    to_eps_and_x0,
    tweedie_x0,
    validate_timesteps,
)
from sqdf.errors import ConfigError

# ---- betas and abar ------------------------------------------------------------------------------------------


def test_linear_betas_endpoints_monotone_and_abar():
    betas = linear_betas(1000, 1e-4, 0.02)
    assert betas.shape == (1000,)
    assert betas.dtype == torch.float64
    assert float(betas[0]) == pytest.approx(1e-4)
    assert float(betas[-1]) == pytest.approx(0.02)
    assert bool((betas[1:] > betas[:-1]).all())
    abar = alphas_cumprod_from_betas(betas)
    assert bool((abar[1:] < abar[:-1]).all())
    assert bool(((abar > 0) & (abar < 1)).all())
    # independent product in plain Python
    for t in (0, 1, 10, 499, 999):
        expected = math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
        assert float(abar[t]) == pytest.approx(expected, rel=1e-10)
    # DDPM linear schedule: abar at the last step is tiny (about 4e-5)
    assert 1e-5 < float(abar[-1]) < 1e-4


def test_cosine_betas_follow_the_cosine_formula():
    n, s = 1000, 0.008
    betas = cosine_betas(n, s=s)
    assert betas.shape == (n,)
    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())
    abar = alphas_cumprod_from_betas(betas)
    assert bool((abar[1:] < abar[:-1]).all())

    def f(t):
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    # abar at training index i is f(i + 1) / f(0) (no clipping away from the very end)
    for i in (0, 1, 100, 500, 900, 980):
        assert float(abar[i]) == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    # the last beta is clipped at max_beta
    assert float(betas[-1]) == pytest.approx(0.999)


# ---- timestep grids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_train,n_inf", [(1000, 20), (1000, 1), (1000, 999), (100, 10), (10, 3), (50, 7)])
def test_spaced_timesteps(n_train, n_inf):
    ts = spaced_timesteps(n_train, n_inf)
    assert len(ts) == n_inf + 1
    assert ts[0] == n_train - 1
    assert ts[-1] == 0
    assert all(isinstance(t, int) for t in ts)
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_spaced_timesteps_even_spacing_example():
    assert spaced_timesteps(101, 4) == [100, 75, 50, 25, 0]


@pytest.mark.parametrize("n_inf", [0, -1, 1000, 1001])
def test_spaced_timesteps_rejects_bad_counts(n_inf):
    with pytest.raises(ConfigError):
        spaced_timesteps(1000, n_inf)


def test_validate_timesteps_accepts_and_casts():
    assert validate_timesteps([999.0, 500, 0], 1000) == [999, 500, 0]
    assert validate_timesteps([5, 2], 10) == [5, 2]


@pytest.mark.parametrize(
    "ts",
    [
        [999],  # too short
        [],  # too short
        [0, 500, 999],  # increasing
        [999, 500, 500, 0],  # not strictly decreasing
        [1000, 500, 0],  # above N-1
        [999, 500, -1],  # below 0
    ],
)
def test_validate_timesteps_errors(ts):
    with pytest.raises(ConfigError):
        validate_timesteps(ts, 1000)


@pytest.mark.parametrize("eta", [-0.1, 1.1, 2.0])
def test_noise_schedule_rejects_eta_outside_unit_interval(eta):
    with pytest.raises(ConfigError):
        NoiseSchedule(ScheduleConfig(num_train_steps=100), 10, eta=eta)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_noise_schedule_accepts_eta(eta):
    sch = NoiseSchedule(ScheduleConfig(num_train_steps=100), 10, eta=eta)
    assert sch.num_steps == 10
    assert sch.abar.shape == (11,)
    assert sch.sigmas.shape == (10,)
    if eta == 0.0:
        assert bool((sch.sigmas == 0).all())
    else:
        assert bool((sch.sigmas > 0).all())


def test_noise_schedule_custom_timesteps_and_abar_lookup():
    sch = NoiseSchedule(ScheduleConfig(num_train_steps=100), timesteps=[99, 50, 10, 0])
    assert sch.timesteps == [99, 50, 10, 0]
    assert sch.num_steps == 3
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sch.abar, abar[[99, 50, 10, 0]])
    torch.testing.assert_close(sch.abar_at_train_step(torch.tensor([0, 50])), abar[[0, 50]])
    with pytest.raises(ConfigError):
        NoiseSchedule(ScheduleConfig(num_train_steps=100), timesteps=[100, 0])


def test_schedule_config_validate():
    with pytest.raises(ConfigError):
        ScheduleConfig(kind="quadratic").validate()
    with pytest.raises(ConfigError):
        ScheduleConfig(num_train_steps=1).validate()
    with pytest.raises(ConfigError):
        ScheduleConfig(beta_start=0.02, beta_end=0.01).validate()


# ---- prediction conversions ----------------------------------------------------------------------------------


def _noisy(seed=0, b=5, d=3, per_sample=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, d, generator=g, dtype=torch.float64)
    eps = torch.randn(b, d, generator=g, dtype=torch.float64)
    if per_sample:
        a = torch.rand(b, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    else:
        a = torch.tensor(0.37, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x0, eps, a, x_t


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_to_eps_and_x0_round_trip(ptype, per_sample):
    x0, eps, a, x_t = _noisy(per_sample=per_sample)
    target = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0,
    }[ptype]
    eps_hat, x0_hat = to_eps_and_x0(target, x_t, a, ptype)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(x0_hat, x0)


def test_to_eps_and_x0_accepts_float_abar():
    x0, eps, _, _ = _noisy()
    a = 0.81
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    eps_hat, x0_hat = to_eps_and_x0(eps, x_t, a, "epsilon")
    torch.testing.assert_close(x0_hat, x0)


def test_to_eps_and_x0_rejects_unknown_type():
    x0, eps, a, x_t = _noisy()
    with pytest.raises(ConfigError):
        to_eps_and_x0(eps, x_t, a, "score")


@pytest.mark.parametrize("per_sample", [False, True])
def test_tweedie_x0_recovers_x0_with_true_noise(per_sample):
    x0, eps, a, x_t = _noisy(seed=3, per_sample=per_sample)
    torch.testing.assert_close(tweedie_x0(x_t, eps, a), x0)


# ---- DDIM step -----------------------------------------------------------------------------------------------

ABAR_PAIRS = [(0.3, 0.6), (0.05, 0.9), (0.97, 0.999), (0.5, 0.5001)]


@pytest.mark.parametrize("a_t,a_p", ABAR_PAIRS)
def test_ddim_sigma_eta_one_is_ddpm_posterior_std(a_t, a_p):
    expected = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    assert float(ddim_sigma(a_t, a_p, 1.0)) == pytest.approx(expected, rel=1e-12)
    assert float(ddim_sigma(a_t, a_p, 0.5)) == pytest.approx(0.5 * expected, rel=1e-12)
    assert float(ddim_sigma(a_t, a_p, 0.0)) == 0.0


def test_ddim_sigma_vectorized():
    a_t = torch.tensor([0.3, 0.05], dtype=torch.float64)
    a_p = torch.tensor([0.6, 0.9], dtype=torch.float64)
    s = ddim_sigma(a_t, a_p, 1.0)
    expected = [math.sqrt((1 - p) / (1 - t) * (1 - t / p)) for t, p in zip(a_t.tolist(), a_p.tolist())]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("a_t,a_p", ABAR_PAIRS)
def test_ddim_mean_eta_one_is_ddpm_posterior_mean(a_t, a_p):
    x0, eps, _, _ = _noisy(seed=7)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    alpha_t = a_t / a_p
    beta_t = 1 - alpha_t
    c0 = math.sqrt(a_p) * beta_t / (1 - a_t)
    ct = math.sqrt(alpha_t) * (1 - a_p) / (1 - a_t)
    expected = c0 * x0 + ct * x_t
    sigma = ddim_sigma(a_t, a_p, 1.0)
    got = ddim_mean(x0, eps, a_p, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_ddim_mean_eta_zero_is_deterministic_ddim():
    x0, eps, _, _ = _noisy(seed=8)
    a_p = 0.7
    got = ddim_mean(x0, eps, a_p, 0.0)
    torch.testing.assert_close(got, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)


# ---- Gaussian helpers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("std_kind", ["scalar", "per_sample", "per_sample_bcast"])
def test_gaussian_log_prob_matches_torch_normal(std_kind):
    g = torch.Generator().manual_seed(11)
    b = 4
    x = torch.randn(b, 2, 3, generator=g, dtype=torch.float64)
    mean = torch.randn(b, 2, 3, generator=g, dtype=torch.float64)
    s_vec = torch.rand(b, generator=g, dtype=torch.float64) + 0.2
    if std_kind == "scalar":
        std, s_full = 0.7, torch.full((b, 1, 1), 0.7, dtype=torch.float64)
    elif std_kind == "per_sample":
        std, s_full = s_vec, s_vec.view(b, 1, 1)
    else:
        std, s_full = s_vec.view(b, 1, 1), s_vec.view(b, 1, 1)
    expected = Normal(mean, s_full.expand_as(mean)).log_prob(x).flatten(1).sum(1)
    got = gaussian_log_prob(x, mean, std)
    assert got.shape == (b,)
    torch.testing.assert_close(got, expected)


def _kl_reference(mp, sp, mq, sq):
    return kl_divergence(Normal(mp, sp.expand_as(mp)), Normal(mq, sq.expand_as(mq))).flatten(1).sum(1)


def test_gaussian_kl_matches_torch_different_scalar_stds():
    g = torch.Generator().manual_seed(12)
    mp = torch.randn(5, 3, generator=g, dtype=torch.float64)
    mq = torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = gaussian_kl(mp, 0.4, mq, 1.3)
    expected = _kl_reference(mp, torch.tensor(0.4, dtype=torch.float64), mq, torch.tensor(1.3, dtype=torch.float64))
    torch.testing.assert_close(got, expected)


def test_gaussian_kl_matches_torch_per_sample_stds():
    g = torch.Generator().manual_seed(13)
    b = 6
    mp = torch.randn(b, 2, 2, generator=g, dtype=torch.float64)
    mq = torch.randn(b, 2, 2, generator=g, dtype=torch.float64)
    sp = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    sq = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    got = gaussian_kl(mp, sp, mq, sq)
    expected = _kl_reference(mp, sp.view(b, 1, 1), mq, sq.view(b, 1, 1))
    torch.testing.assert_close(got, expected)
    # [B, 1, 1]-shaped stds give the same answer
    torch.testing.assert_close(gaussian_kl(mp, sp.view(b, 1, 1), mq, sq.view(b, 1, 1)), expected)


def test_gaussian_kl_equal_stds_is_scaled_squared_distance():
    g = torch.Generator().manual_seed(14)
    b = 5
    mp = torch.randn(b, 4, generator=g, dtype=torch.float64)
    mq = torch.randn(b, 4, generator=g, dtype=torch.float64)
    s = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    got = gaussian_kl(mp, s, mq, s)
    expected = ((mp - mq) ** 2).sum(1) / (2 * s**2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, _kl_reference(mp, s.view(b, 1), mq, s.view(b, 1)))
    # zero when the means agree
    assert bool((gaussian_kl(mp, s, mp, s).abs() < 1e-12).all())


def test_gaussian_log_prob_gradient_wrt_mean_finite_differences():
    g = torch.Generator().manual_seed(15)
    b, d = 3, 4
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    mean = torch.randn(b, d, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    analytic = (x - mean) / std[:, None] ** 2

    # central finite differences, one coordinate at a time
    h = 1e-6
    fd = torch.zeros_like(mean)
    for i in range(b):
        for j in range(d):
            mp, mm = mean.clone(), mean.clone()
            mp[i, j] += h
            mm[i, j] -= h
            fd[i, j] = (gaussian_log_prob(x, mp, std)[i] - gaussian_log_prob(x, mm, std)[i]) / (2 * h)
    torch.testing.assert_close(fd, analytic, rtol=1e-6, atol=1e-7)

    m = mean.clone().requires_grad_(True)
    gaussian_log_prob(x, m, std).sum().backward()
    torch.testing.assert_close(m.grad, analytic)


def test_scaled_linear_matches_stable_diffusion_betas():
    from diffusers import DDPMScheduler

    ours = NoiseSchedule(ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012), 10)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs, rtol=1e-6, atol=1e-7)


def test_coefficient_forms_equal_the_vp_forms():
    s = NoiseSchedule(ScheduleConfig(), 20, eta=0.7)
    torch.testing.assert_close(s.signal**2 + s.noise**2, torch.ones(21, dtype=torch.float64))
    general = ddim_sigma_coeffs(s.signal[:-1], s.noise[:-1], s.signal[1:], s.noise[1:], 0.7)
    torch.testing.assert_close(general, s.sigmas)


def test_flow_prediction_inverts_the_interpolant():
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64)
    x = (1 - s) * x0 + s * eps
    eps_hat, x0_hat = prediction_to_eps_and_x0(eps - x0, x, 1 - s, s, "flow")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_flow_schedule_grid_and_stds():
    from diffusers import FlowMatchEulerDiscreteScheduler

    fs = FlowMatchSchedule(num_inference_steps=8, eta=1.0, shift=3.0, step="ddim")
    assert fs.num_steps == 8 and fs.timesteps[0] == pytest.approx(1000.0)
    assert fs.timesteps[-1] == pytest.approx(1000 * 3e-3 / (1 + 2e-3))  # shifted 1/1000
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # diffusers' shift formula on the same unshifted times
    times = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    torch.testing.assert_close(shift_flow_time(times, 3.0),
                               sched.config.shift * times / (1 + (sched.config.shift - 1) * times))
    assert bool((fs.sigmas > 0).all())  # every step is stochastic, so step KLs and log-probs exist
    # the posterior std of x_{s'} given (x_s, x0) under x_s = (1-s) x0 + s eps, by the Gaussian conditioning formula
    s, s1 = fs.flow_times[2], fs.flow_times[3]
    a, b, a1, b1 = 1 - s, s, 1 - s1, s1
    # x_s = (a/a1) x_{s'} + noise with variance b^2 - (a b1 / a1)^2, so Var(x_{s'} | x_s, x0) is:
    var_fwd = b**2 - (a * b1 / a1) ** 2
    post_var = b1**2 * var_fwd / (var_fwd + (a / a1) ** 2 * b1**2)
    assert float(fs.sigmas[2]) == pytest.approx(float(post_var.sqrt()), rel=1e-9)
    with pytest.raises(ConfigError, match="shift"):
        FlowMatchSchedule(shift=0.0)


def test_ode_subgrid_reaches_the_data_end():
    vp, fs = NoiseSchedule(ScheduleConfig(), 10), FlowMatchSchedule(10)
    t = torch.tensor([999.0, 500.0])
    assert vp.subgrid(t, 1.0).tolist() == [0.0, 0.0]
    sig, noi = fs.coefficients_at(fs.subgrid(t, 1.0))
    assert sig.tolist() == [1.0, 1.0] and noi.tolist() == [0.0, 0.0]
