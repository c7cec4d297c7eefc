"""Consistency models of the toy (mixture) tasks: the probability-flow ODE solve against its closed form, the
model's boundary and start, distillation accuracy against a fine ODE solve, caching, and SQDF's consistency
estimator on a toy task."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sqdf.diffusion.mixture import GaussianMixture
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError
from sqdf.models import toy_consistency as tc
from sqdf.tasks import TASKS, default_task_config

pytestmark = pytest.mark.usefixtures("one_thread")

ABAR = NoiseSchedule(ScheduleConfig()).alphas_cumprod
STEPS = 300  # distillation steps in these tests (the default is 3000): a few seconds on one core


def _task(name: str, **config):
    return TASKS[name](dataclasses.replace(default_task_config(name), **config))


def _gaussian_flow(x, t, var):
    """Closed-form PF-ODE map of N(0, var I) from timestep t to timestep 0: x * sd_0 / sd_t."""
    a, a0 = ABAR[t][:, None], ABAR[0]
    return x * ((a0 * var + 1 - a0) / (a * var + 1 - a)).sqrt()


@pytest.fixture(scope="module")
def gmm1_file(tmp_path_factory):
    """A gmm1 consistency model distilled with few steps, written to a temporary task.consistency_path."""
    path = tmp_path_factory.mktemp("consistency") / "gmm1.safetensors"
    _task("gmm1", consistency_path=str(path)).consistency_model(steps=STEPS)
    return path


def test_ode_solve_matches_the_closed_form_of_one_gaussian():
    mix = GaussianMixture.isotropic([[0.0, 0.0]], 0.3)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 700, 300, 20])
    x = tc.forward_process_pairs(mix, ABAR, t, g)
    exact = _gaussian_flow(x, t, 0.3)
    assert (tc.ode_targets(mix, ABAR, x, t, 64) - exact).abs().max() < 1e-2
    assert (tc.ode_targets(mix, ABAR, x, t, 512) - exact).abs().max() < 2e-4  # second order: 8x steps, ~64x less
    assert torch.equal(tc.ode_targets(mix, ABAR, x, torch.zeros_like(t)), x)  # t = 0: the state itself


def test_model_boundary_and_start_are_exact_for_one_gaussian():
    """f(x, 0) = x; an untrained model is each component's exact flow, so for one Gaussian it is exact already."""
    mix = GaussianMixture.isotropic([[1.0, -2.0]], 0.5)
    model = tc.ToyConsistencyModel(mix, ABAR)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert torch.equal(model(x, torch.zeros(6, dtype=torch.long)), x)
    t = torch.tensor([999, 800, 500, 200, 50, 1])
    shift = ABAR[t].sqrt()[:, None] * torch.tensor([1.0, -2.0], dtype=torch.float64)
    expected = ABAR[0].sqrt() * torch.tensor([1.0, -2.0], dtype=torch.float64) + _gaussian_flow(x - shift, t, 0.5)
    torch.testing.assert_close(model(x, t), expected, rtol=1e-9, atol=1e-9)


def test_distilled_model_is_close_to_the_fine_ode_solve(gmm1_file):
    task = _task("gmm1", consistency_path=str(gmm1_file))
    model = task.consistency_model()
    untrained = tc.ToyConsistencyModel(task.base, ABAR)
    times = [999, 500, 250, 50]
    mse = tc.consistency_mse(model, task.base, ABAR, times, n=512, ode_steps=128)
    start = tc.consistency_mse(untrained, task.base, ABAR, times, n=512, ode_steps=128)
    # RMS error in data units (modes 4 apart, component std 0.55); 3000 steps (the default) reach 0.11 / 0.09 / 0.07
    assert mse[999] ** 0.5 < 0.6 and mse[500] ** 0.5 < 0.6 and mse[250] ** 0.5 < 0.25 and mse[50] ** 0.5 < 0.02
    assert mse[999] < start[999] / 9  # the untrained mixture of flows cannot pick a mode from pure noise
    x = torch.randn(8, 2, requires_grad=True)
    model(x, torch.full((8,), 400)).sum().backward()  # differentiable in x (SQDF's estimator needs it)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(not p.requires_grad for p in model.parameters())


def test_cache_reloads_the_same_model_and_refuses_another_tasks_file(gmm1_file, tmp_path):
    a = _task("gmm1", consistency_path=str(gmm1_file)).consistency_model()
    b = _task("gmm1", consistency_path=str(gmm1_file)).consistency_model()
    x, t = torch.randn(16, 2), torch.randint(0, 1000, (16,))
    assert torch.equal(a(x, t), b(x, t))
    with pytest.raises(ConfigError, match="another mixture or schedule"):
        _task("gmm2", consistency_path=str(gmm1_file)).consistency_model()
    with pytest.raises(ConfigError, match="another mixture or schedule"):
        _task("gmm1", consistency_path=str(gmm1_file), schedule="cosine").consistency_model()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        _task("gmm1", consistency_path=str(bad)).consistency_model()


def test_distillation_is_deterministic_and_leaves_the_global_rng_alone():
    mix = GaussianMixture.isotropic([[-2.0, 0.0], [2.0, 0.0]], 0.3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = tc.distill_toy_consistency(mix, ABAR, steps=5, pool_size=256, ode_steps=8)
    assert torch.equal(torch.get_rng_state(), before)
    b = tc.distill_toy_consistency(mix, ABAR, steps=5, pool_size=256, ode_steps=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sqdf_with_the_consistency_estimator_runs_on_a_toy_task(gmm1_file, tmp_path):
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    config = default_config("sqdf", "gmm1")
    config.update({"trainer": {"steps": 2, "eval_samples": 64, "eval_every": 0, "progress": False, "plots": False,
                               "tensorboard": False, "floor": False, "device": "cpu"},
                   "task": {"num_inference_steps": 10, "consistency_path": str(gmm1_file)},
                   "method": {"estimator": "consistency", "batch_size": 8, "train_batch_size": 8,
                              "critic_warmup": 0, "critic_batch_size": 16}})
    trainer = Trainer("gmm1", "sqdf", config, str(tmp_path / "run"))
    assert isinstance(trainer.policy.consistency_model, tc.ToyConsistencyModel)
    start = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    summary = trainer.train()
    assert summary["iterations"] == 2 and torch.isfinite(torch.tensor(summary["objective"]))
    assert any(not torch.equal(a, p) for a, p in zip(start, trainer.policy.trainable_parameters()))
