"""Final-marginal error of the samplers: the closed form for Gaussian data against Monte Carlo through the policy,
Flow-GRPO's SDE step against its Euler-Maruyama form, and the flow grid's end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqdf.diffusion.marginals import gaussian_marginal_error, gaussian_marginal_variances
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError

C = 0.5  # data variance per dimension


class _ExactGaussianDenoiser(nn.Module):
    """The exact prediction for data N(0, C I): x0_hat = signal C / (signal^2 C + noise^2) x (eps or velocity)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.prediction_type = "flow" if isinstance(schedule, FlowMatchSchedule) else "epsilon"
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        signal, noise = self.schedule.coefficients_at(t.to(torch.float64))
        signal, noise = signal.to(x.dtype)[:, None], noise.to(x.dtype)[:, None]
        x0 = signal * C / (signal**2 * C + noise**2) * x
        eps = (x - signal * x0) / noise
        return (eps - x0 if self.prediction_type == "flow" else eps) + 0 * self.dummy


@pytest.mark.parametrize("schedule", [
    NoiseSchedule(ScheduleConfig(), 10, eta=1.0),
    NoiseSchedule(ScheduleConfig(kind="cosine"), 10, eta=0.0),
    FlowMatchSchedule(10, eta=0.7, shift=3.0),
    FlowMatchSchedule(10, eta=1.0, shift=1.0, step="ddim"),
], ids=["vp-ddpm", "vp-ddim", "flow-sde", "flow-ddim"])
def test_closed_form_variance_matches_monte_carlo_through_the_policy(schedule):
    policy = DiffusionPolicy(_ExactGaussianDenoiser(schedule), schedule, (4,)).to(torch.float64)
    traj = policy.sample(20000, generator=torch.Generator().manual_seed(0), with_reference=False)
    mc = traj.states.var(dim=(0, 2))  # [T + 1]
    exact = gaussian_marginal_variances(schedule, C)
    # 80,000 draws per level: the sample variance's relative std is sqrt(2 / 80000) = 0.5%
    torch.testing.assert_close(mc, exact, rtol=0.02, atol=0.0)


def test_flow_sde_step_is_flow_grpos_euler_maruyama_step():
    """mean = x - [v + sigma_t^2 / (2 s) (x + (1 - s) v)] (s - s'), std = sigma_t sqrt(s - s'),
    sigma_t = a sqrt(s / (1 - s)), equals (1 - s') x0 + eps_coef eps, sigma, at every step but the first."""
    a = 0.7
    fs = FlowMatchSchedule(8, eta=a, shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for k in range(1, fs.num_steps):
        s, s1 = fs.flow_times[k], fs.flow_times[k + 1]
        x, v = (1 - s) * x0 + s * eps, eps - x0
        sigma_t2 = a**2 * s / (1 - s)
        mean = x - (v + sigma_t2 / (2 * s) * (x + (1 - s) * v)) * (s - s1)
        torch.testing.assert_close((1 - s1) * x0 + fs.eps_coefs[k] * eps, mean)
        assert float(fs.sigmas[k]) == pytest.approx(float((sigma_t2 * (s - s1)).sqrt()), rel=1e-12)
    # at s = 1 the 1 / (1 - s) is taken at the next grid time, as Flow-GRPO does
    assert bool(torch.isfinite(fs.sigmas).all()) and bool((fs.sigmas > 0).all())


def test_flow_sde_step_keeps_more_of_the_marginal_than_ddim_at_the_presets_steps():
    for steps in (10, 28, 50):
        sde = gaussian_marginal_error(FlowMatchSchedule(steps, eta=0.7, shift=3.0), 1.0)
        ddim1 = gaussian_marginal_error(FlowMatchSchedule(steps, eta=1.0, shift=3.0, step="ddim"), 1.0)
        ode = gaussian_marginal_error(FlowMatchSchedule(steps, eta=0.0, shift=3.0, step="ddim"), 1.0)
        assert ddim1 < ode < sde < 0  # all lose variance; the SDE step the least
    assert gaussian_marginal_error(FlowMatchSchedule(28, eta=0.7, shift=3.0), 1.0) == pytest.approx(-0.069, abs=2e-3)
    # first order: doubling the steps about halves the error
    e28, e56 = (gaussian_marginal_error(FlowMatchSchedule(n, eta=0.7), 1.0) for n in (28, 56))
    assert 1.7 < e28 / e56 < 2.3


def test_flow_grid_ends_at_the_shifted_time():
    fs = FlowMatchSchedule(28, shift=3.0)
    assert float(fs.flow_times[-1]) == pytest.approx(3 / 1002)  # shift / (N + shift - 1), not 1 / N
    with pytest.raises(ConfigError, match="step='euler'"):
        FlowMatchSchedule(28, step="euler")
    with pytest.raises(ConfigError, match="noise level"):
        FlowMatchSchedule(28, eta=0.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        FlowMatchSchedule(28, eta=1.5, step="ddim")
