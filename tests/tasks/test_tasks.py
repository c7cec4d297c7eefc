"""Built-in tasks with known optima (BENCHMARKS.md tasks 1-3) and the generic MixtureTask machinery."""

from __future__ import annotations

import math

import pytest
import torch

import sqdf.tasks.mixture_task as mixture_task
from sqdf.diffusion.mixture import GaussianMixture, QuadraticReward
from sqdf.errors import ConfigError
from sqdf.tasks.base import TaskConfig
from sqdf.tasks.builtin import MIX9_WEIGHTS, TASKS
from sqdf.tasks.mixture_task import MixtureTask


def _task(name, **cfg):
    return TASKS[name](TaskConfig(**cfg))


def _grid_quadrature(task, L=9.0, n=801):
    """log Z, E_p*[r] and KL(p*||p_ref) by quadrature on a 2-D grid (independent of the closed form)."""
    g = torch.linspace(-L, L, n, dtype=torch.float64)
    h = float(g[1] - g[0])
    X, Y = torch.meshgrid(g, g, indexing="ij")
    x = torch.stack([X.flatten(), Y.flatten()], 1)
    r = task.reward(x)
    lw = task.base.log_prob(x) + r / task.alpha
    log_z = float(torch.logsumexp(lw, 0)) + 2 * math.log(h)
    p = torch.exp(lw - torch.logsumexp(lw, 0))
    r_mean = float((p * r).sum())
    return log_z, r_mean, (r_mean - task.alpha * log_z) / task.alpha


# ---- known optima --------------------------------------------------------------------------------------------


def test_gmm1_known_optimum():
    task = _task("gmm1")
    opt = task.known_optimum()
    assert opt.method == "closed form" and opt.optimum_stderr == 0.0
    assert opt.optimum == pytest.approx(-1.440, abs=5e-4)
    assert opt.reward_mean == pytest.approx(-0.2906, abs=3e-4)
    assert opt.kl == pytest.approx(1.149, abs=5e-4)
    w = opt.mode_weights
    assert w[4] == pytest.approx(0.370, abs=1e-3)  # (0, 0)
    assert w[1] == pytest.approx(0.315, abs=1e-3) and w[7] == pytest.approx(0.315, abs=1e-3)  # (-4, 0), (4, 0)
    log_z, r_mean, kl = _grid_quadrature(task)
    assert opt.optimum == pytest.approx(log_z, abs=1e-6)
    assert opt.reward_mean == pytest.approx(r_mean, abs=1e-6)
    assert opt.kl == pytest.approx(kl, abs=1e-6)


def test_gmm2_known_optimum():
    task = _task("gmm2")
    opt = task.known_optimum()
    assert opt.method == "closed form"
    # BENCHMARKS.md: E_p*[r] = -1.337, KL 1.631 (quoted to about 3e-3; quadrature gives -1.3400 and 1.6278)
    assert opt.reward_mean == pytest.approx(-1.337, abs=5e-3)
    assert opt.kl == pytest.approx(1.631, abs=5e-3)
    w = opt.mode_weights
    assert w[2] == pytest.approx(0.80, abs=5e-3)  # (0, 4)
    assert w[6] == pytest.approx(0.18, abs=5e-3)  # (0, -4)
    assert task.base.means[2].tolist() == pytest.approx([0.0, 4.0], abs=1e-12)
    assert task.base.means[6].tolist() == pytest.approx([0.0, -4.0], abs=1e-12)
    log_z, r_mean, kl = _grid_quadrature(task)
    assert opt.optimum == pytest.approx(log_z, abs=1e-6)
    assert opt.reward_mean == pytest.approx(r_mean, abs=1e-6)
    assert opt.kl == pytest.approx(kl, abs=1e-6)


def test_mix25to9_known_optimum():
    task = _task("mix25to9")
    opt = task.known_optimum()
    assert opt.optimum == 0.0
    assert opt.kl == pytest.approx(1.158, abs=0.02)
    assert opt.reward_mean == pytest.approx(opt.kl, abs=1e-9)  # alpha = 1 and J* = 0
    # the inner 3x3 components (grid indices 5i + j, i, j in 1..3) carry weights (4,10,4,5,10,5,4,15,4)/61
    inner = [5 * i + j for i in (1, 2, 3) for j in (1, 2, 3)]
    w = torch.tensor(opt.mode_weights)
    torch.testing.assert_close(w[inner], torch.tensor(MIX9_WEIGHTS, dtype=torch.float32) / 61, rtol=0, atol=0.01)
    assert float(w.sum() - w[inner].sum()) < 1e-3
    with pytest.raises(ConfigError):
        _task("mix25to9", alpha=0.5)


def test_mix25to9_reward_is_the_log_density_ratio():
    task = _task("mix25to9")
    x = torch.tensor([[0.0, 0.0], [5.0, -5.0], [10.0, 10.0]], dtype=torch.float64)
    r = task.reward(x)
    # at the center (0,0) of the prior's 25 equal modes vs the target's weight 10/61 for it:
    # p9 ≈ (10/61) N(0; 0, .3 I), p25 ≈ (1/25) N(0; 0, .3 I)  =>  r ≈ log(250/61)
    assert float(r[0]) == pytest.approx(math.log(250 / 61), abs=1e-6)
    # (10, 10) is outside the target's support: very negative
    assert float(r[2]) < -50


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_gaussian_known_optimum(dim):
    task = _task("gaussian", dim=dim)
    w = torch.tensor([1.0 if i % 2 == 0 else -0.5 for i in range(dim)], dtype=torch.float64)
    sq = float((w * w).sum())
    opt = task.known_optimum()
    # base N(0, I), r = w.x, alpha 1: J* = |w|^2/2, E*[r] = |w|^2, KL = |w|^2/2
    assert opt.optimum == pytest.approx(sq / 2, rel=1e-12)
    assert opt.reward_mean == pytest.approx(sq, rel=1e-12)
    assert opt.kl == pytest.approx(sq / 2, rel=1e-12)


def test_gaussian_quadratic_known_optimum():
    task = _task("gaussian-quadratic", dim=2)
    opt = task.known_optimum()
    # base N(0, I), r = -|x - b|^2/2, |b| = 2: log Z = -|b|^2/4 - (d/2) log 2; target N(b/2, I/2)
    assert opt.optimum == pytest.approx(-1.0 - math.log(2.0), rel=1e-12)
    target = task.target_mixture
    torch.testing.assert_close(target.means[0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(target.covs[0], 0.5 * torch.eye(2, dtype=torch.float64))


def test_gaussian_target_samples_moments():
    dim = 3
    task = _task("gaussian", dim=dim)
    n = 40_000
    x = task.target_samples(n, torch.Generator().manual_seed(0))
    assert x.shape == (n, dim) and x.dtype == torch.float64
    w = torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64)  # target N(w / alpha, I)
    torch.testing.assert_close(x.mean(0), w, rtol=0, atol=5 / math.sqrt(n))
    torch.testing.assert_close(torch.cov(x.T), torch.eye(dim, dtype=torch.float64), rtol=0, atol=0.03)


def test_numeric_optimum_agrees_with_closed_form(monkeypatch):
    monkeypatch.setattr(mixture_task, "NUMERIC_SAMPLES", 1 << 18)
    closed = _task("gmm1")
    quad = closed._reward
    assert isinstance(quad, QuadraticReward)
    numeric = MixtureTask(closed.base, lambda x, cond=None: quad(x, cond), 1.0, name="gmm1-callable")
    assert numeric.target_mixture is None
    opt = numeric.known_optimum()
    ref = closed.known_optimum()
    assert "Monte Carlo" in opt.method
    assert opt.optimum_stderr > 0
    assert abs(opt.optimum - ref.optimum) < 4 * opt.optimum_stderr
    assert opt.reward_mean == pytest.approx(ref.reward_mean, abs=0.02)
    assert opt.kl == pytest.approx(ref.kl, abs=0.03)
    torch.testing.assert_close(torch.tensor(opt.mode_weights), torch.tensor(ref.mode_weights), rtol=0, atol=0.01)
    # importance-resampled target samples look like the exact target
    n = 4000
    xs = numeric.target_samples(n, torch.Generator().manual_seed(1))
    tgt = closed.target_mixture
    mean = (tgt.weights[:, None] * tgt.means).sum(0)
    second = (tgt.weights[:, None] * (tgt.means**2 + torch.diagonal(tgt.covs, dim1=1, dim2=2))).sum(0)
    sd = (second - mean**2).sqrt()
    assert bool(((xs.mean(0) - mean).abs() < 5 * sd / math.sqrt(n)).all())
    # the outer modes' total weight, 0.630 in closed form
    frac = float((xs[:, 0].abs() > 2).double().mean())
    assert frac == pytest.approx(ref.mode_weights[1] + ref.mode_weights[7], abs=5 * math.sqrt(0.25 / n))


def test_numeric_optimum_random_mixture_other_alpha(monkeypatch):
    monkeypatch.setattr(mixture_task, "NUMERIC_SAMPLES", 1 << 18)
    g = torch.Generator().manual_seed(5)
    means = torch.randn(3, 2, generator=g, dtype=torch.float64) * 2
    base = GaussianMixture.isotropic(means, 0.5, weights=[1.0, 2.0, 3.0])
    reward = QuadraticReward(torch.tensor([[0.5, 0.1], [0.1, 0.3]]), torch.tensor([0.4, -0.7]), c=0.2)
    alpha = 2.0
    closed = MixtureTask(base, reward, alpha)
    numeric = MixtureTask(base, lambda x, cond=None: reward(x, cond), alpha)
    a, b = numeric.known_optimum(), closed.known_optimum()
    assert abs(a.optimum - b.optimum) < 4 * a.optimum_stderr


def test_mixture_task_rejects_bad_alpha():
    base = GaussianMixture.isotropic([[0.0, 0.0]], 1.0)
    for alpha in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            MixtureTask(base, QuadraticReward.linear([1.0, 0.0]), alpha)
    # the config's alpha overrides the constructor's
    t = MixtureTask(base, QuadraticReward.linear([1.0, 0.0]), 1.0, TaskConfig(alpha=0.5))
    assert t.alpha == 0.5
    assert t.known_optimum().optimum == pytest.approx(1.0 / (2 * 0.5))


def test_sampling_floor_gmm1_100_steps():
    task = _task("gmm1")
    floor = task.sampling_floor(100)
    assert floor["num_inference_steps"] == 100
    assert floor["regret"] == pytest.approx(0.06, abs=0.15)
    # BENCHMARKS: exact-score floor E[r] = -0.257 at 100 steps
    assert floor["reward_mean"] == pytest.approx(-0.257, abs=4 * floor["reward_stderr"] + 0.01)
