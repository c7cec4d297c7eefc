"""InPO: the inversion grid, DDIM inversion and the back-solved noise by hand, one iteration's loss by hand, config
errors, a toy run that moves toward the winners, and a CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sqdf.errors import ConfigError
from sqdf.methods import METHODS, InPO, InPOConfig
from sqdf.methods.base import IterationContext
from sqdf.methods.diffusion_dpo import training_times
from sqdf.methods.inpo import back_solved_noise, ddim_invert, inversion_grid


class Linear(nn.Module):
    """eps_net(x, t) = c x: its DDIM inversion is a product of scalars, computable by hand."""

    prediction_type = "epsilon"

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        return self.c * x


def _schedule():
    from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig

    return NoiseSchedule(ScheduleConfig(), 10)


def _linear_policy(c: float = 0.5, c_ref: float = 0.3):
    from sqdf.diffusion.policy import DiffusionPolicy

    return DiffusionPolicy(Linear(c), _schedule(), (2,), reference=Linear(c_ref))


def _hand_inversion(x0: torch.Tensor, t: int, c: float, abar: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """DDIM inversion of one sample by eps = c x, written out: up the grid to its largest point <= t."""
    x = x0.clone()
    points = [g for g in grid if g <= t]
    for g, g_next in zip(points[:-1], points[1:]):
        a, a1 = float(abar[g]), float(abar[g_next])
        eps = c * x
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a1) * x0_hat + math.sqrt(1 - a1) * eps
    return x


def test_inversion_grid_vp_and_flow():
    from sqdf.diffusion.schedule import FlowMatchSchedule

    assert inversion_grid(_schedule(), 10).tolist() == list(range(0, 1000, 100))
    assert inversion_grid(_schedule(), 1).tolist() == [0]
    assert inversion_grid(_schedule(), 3).tolist() == [0, 333, 666]
    torch.testing.assert_close(inversion_grid(FlowMatchSchedule(10), 4), torch.tensor([0.0, 250, 500, 750],
                                                                                      dtype=torch.float64))
    with pytest.raises(ConfigError, match="exceeds"):
        inversion_grid(_schedule(), 1001)


def test_ddim_inversion_and_back_solved_noise_by_hand():
    policy = _linear_policy()
    abar = policy.schedule.alphas_cumprod
    grid = inversion_grid(policy.schedule, 10)
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([0, 99, 450, 999])  # no inverse step, none (largest grid point 0), four steps, nine steps
    x_inv = ddim_invert(policy, x0, t, None, grid, 0.0, None)
    for i in range(4):
        torch.testing.assert_close(x_inv[i], _hand_inversion(x0[i], int(t[i]), 0.5, abar, grid.tolist()))
    torch.testing.assert_close(x_inv[:2], x0[:2])  # below the first grid step the latent is x0 itself
    eps = back_solved_noise(policy.schedule, x0, x_inv, t)
    a = abar[t].view(-1, 1)
    torch.testing.assert_close(eps, (x_inv - a.sqrt() * x0) / (1 - a).sqrt())
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_inv)  # the identity, exactly
    # the reference network inverts with its own eps
    ref_inv = ddim_invert(policy, x0, t, None, grid, 0.0, None, which="reference")
    torch.testing.assert_close(ref_inv[3], _hand_inversion(x0[3], 999, 0.3, abar, grid.tolist()))


def test_inversion_noise_is_the_posterior_std_fraction():
    """With eps = 0 x, one inverse step 0 -> 100 maps x0 to sqrt(abar_100) x0 (+ eta * std * z)."""
    policy = _linear_policy(c=0.0)
    grid = inversion_grid(policy.schedule, 10)
    x0 = torch.ones(4096, 2, dtype=torch.float64)
    t = torch.full((4096,), 150)
    x = ddim_invert(policy, x0, t, None, grid, 0.5, torch.Generator().manual_seed(0))
    a0, a1 = policy.schedule.alphas_cumprod[0], policy.schedule.alphas_cumprod[100]
    std = ((1 - a0) / (1 - a1) * (1 - a1 / a0)).sqrt()
    assert float(x.mean()) == pytest.approx(float(a1.sqrt()), abs=4 * 0.5 * float(std) / 90)
    assert float(x.std()) == pytest.approx(0.5 * float(std), rel=0.05)


def test_exact_gaussian_inversion_is_deterministic_and_closed_form():
    """For the N(0, I) base with its exact score, eps(x, t) = sqrt(1 - abar_t) x, so each inverse step multiplies x
    by sqrt(a a') + sqrt((1 - a)(1 - a')); with no inversion noise the generator does not matter."""
    from sqdf.training.run_setup import build_policy, default_config, make_task

    config = default_config("inpo", "gaussian")
    config.set("task.num_inference_steps", 10, raw=False)
    task = make_task("gaussian", config.task)
    policy = build_policy(task, config, None, "cpu")
    grid = inversion_grid(policy.schedule, 10)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(4))
    one = ddim_invert(policy, x0, t, None, grid, 0.0, torch.Generator().manual_seed(0))
    two = ddim_invert(policy, x0, t, None, grid, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(one, two)
    abar = policy.schedule.alphas_cumprod
    for i in range(64):
        points = [int(g) for g in grid if g <= t[i]]
        factor = 1.0
        for g, g1 in zip(points[:-1], points[1:]):
            a, a1 = float(abar[g]), float(abar[g1])
            factor *= math.sqrt(a * a1) + math.sqrt((1 - a) * (1 - a1))
        torch.testing.assert_close(one[i], x0[i] * factor, rtol=1e-5, atol=1e-6)
    eps = back_solved_noise(policy.schedule, x0, one, t)
    a = abar[t].view(-1, 1).float()
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, one, rtol=1e-5, atol=1e-5)


def test_flow_schedule_inversion_is_the_euler_ode_run_upward():
    from sqdf.diffusion.policy import DiffusionPolicy
    from sqdf.diffusion.schedule import FlowMatchSchedule

    class Velocity(nn.Module):
        prediction_type = "flow"

        def forward(self, x, t, cond=None):
            return -x  # v = eps - x0 = -x, so x0_hat = x - s v = (1 + s) x and eps_hat = x0_hat + v = s x

    policy = DiffusionPolicy(Velocity(), FlowMatchSchedule(10), (2,))
    grid = inversion_grid(policy.schedule, 4)  # 0, 250, 500, 750
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([600.0], dtype=torch.float64)
    x = ddim_invert(policy, x0, t, None, grid, 0.0, None)
    hand = x0.clone()
    for s, s1 in ((0.0, 0.25), (0.25, 0.5)):  # up to 500, the largest grid time <= 600
        x0_hat = hand * (1 + s)
        eps_hat = x0_hat - hand
        hand = (1 - s1) * x0_hat + s1 * eps_hat
    torch.testing.assert_close(x, hand)
    eps = back_solved_noise(policy.schedule, x0, x, t)
    torch.testing.assert_close(0.4 * x0 + 0.6 * eps, x)


def _pair_file(tmp_path, a, b, labels) -> str:
    from sqdf.preferences.data import PreferencePairs, write_pairs

    return write_pairs(PreferencePairs(torch.tensor(a), torch.tensor(b), torch.tensor(labels)),
                       str(tmp_path / "pairs.jsonl"))


def test_one_iteration_loss_equals_the_hand_formula(tmp_path):
    path = _pair_file(tmp_path, [[1.0, -2.0], [0.5, 0.25]], [[-1.0, 3.0], [2.0, 2.0]], [1.0, 0.0])
    policy = _linear_policy(0.5, 0.3)
    config = InPOConfig(data=path, beta=10.0, pairs_per_step=3, inversion_noise=0.0)
    config.validate()
    method = InPO(config, policy, alpha=1.0)
    winners = torch.tensor([[1.0, -2.0], [2.0, 2.0]], dtype=torch.float64)  # pair 1: b won
    losers = torch.tensor([[-1.0, 3.0], [0.5, 0.25]], dtype=torch.float64)
    # the draws the iteration makes, in its order: pair indices, then timesteps
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 2, (3,), generator=g)
    t = training_times(policy.schedule, 3, g)
    abar, grid = policy.schedule.alphas_cumprod, inversion_grid(policy.schedule, 10).tolist()

    def err(x0, ti, c):
        x = _hand_inversion(x0, ti, 0.5, abar, grid)  # inverted by the current policy (c = 0.5)
        a = float(abar[ti])
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return float(((c * x - eps) ** 2).mean())

    expected = 0.0
    for i, ti in zip(idx.tolist(), t.tolist()):
        w, lo = winners[i], losers[i]
        logit = -0.5 * 10.0 * ((err(w, ti, 0.5) - err(lo, ti, 0.5)) - (err(w, ti, 0.3) - err(lo, ti, 0.3)))
        expected += math.log1p(math.exp(-logit)) / 3
    seen = {}

    def step(loss):
        seen["loss"] = loss
        loss.backward()
        return {"grad_norm": 0.0}

    no = lambda *a, **k: (_ for _ in ()).throw(AssertionError("offline: no rollout, no reward"))  # noqa: E731
    stats = method.train_iteration(IterationContext(0, torch.Generator().manual_seed(7), no, no, step))
    assert float(seen["loss"].detach()) == pytest.approx(expected, rel=1e-6)  # the file holds float32
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)
    assert policy.model.c.grad is not None and policy.reference.c.grad is None


def test_registered_offline():
    assert METHODS["inpo"] is InPO and InPO.offline and InPO.config_class is InPOConfig
    assert InPOConfig().beta == 2000.0 and InPOConfig().inversion_steps == 10 and InPOConfig().inversion_noise == 0.1


@pytest.mark.parametrize("kwargs,match", [
    ({"data": None}, "method.data is required"),
    ({"beta": 0.0}, "method.beta=0.0"),
    ({"beta": -1.0}, "method.beta=-1.0"),
    ({"inversion_steps": 0}, "method.inversion_steps=0"),
    ({"inversion_noise": -0.1}, "method.inversion_noise=-0.1"),
    ({"pairs_per_step": 0}, "method.pairs_per_step=0"),
])
def test_bad_config_raises(kwargs, match):
    config = InPOConfig(**{"data": "pairs.jsonl", **kwargs})
    with pytest.raises(ConfigError, match=match):
        config.validate()


def test_inpo_on_pairs_of_the_base_moves_toward_the_winners(tmp_path, train_on_gaussian):
    """Perfect-preference pairs (tau = 0) of the Gaussian base labelled by its linear reward: training raises the
    reward of policy samples, with no reward query."""
    from sqdf.training.preference_pairs import write_reference_pairs

    path = write_reference_pairs("gaussian", 512, str(tmp_path / "pairs.parquet"), temperature=0.0,
                                 settings={"task.num_inference_steps": 10})
    base, final = train_on_gaussian("inpo", steps=30, **{"method.data": path, "method.lr": 3e-3,
                                                         "method.beta": 50.0, "method.pairs_per_step": 128})
    assert final["reward_queries"] == 0
    assert final["reward_mean"] > base["reward_mean"] + 0.2


def test_inpo_runs_through_the_cli(tmp_path):
    from sqdf.cli import main
    from sqdf.training.preference_pairs import write_reference_pairs

    path = write_reference_pairs("gaussian", 32, str(tmp_path / "pairs.jsonl"),
                                 settings={"task.num_inference_steps": 8})
    out = tmp_path / "run"
    assert main(["train", "gaussian", "--method", "inpo", "--steps", "2", "--out", str(out),
                 "--set", f"method.data={path}", "--set", "method.pairs_per_step=8", "--set", "method.beta=5",
                 "--set", "trainer.progress=false", "--set", "trainer.eval_samples=64",
                 "--set", "trainer.tensorboard=false", "--set", "trainer.plots=false", "--set", "trainer.floor=false",
                 "--set", "task.num_inference_steps=8", "--set", "trainer.device=cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_queries"] == 0 and math.isfinite(summary["reward_mean"])
    assert main(["train", "gaussian", "--method", "inpo", "--steps", "2", "--out", str(tmp_path / "bad"),
                 "--set", "trainer.device=cpu"]) == 2  # no method.data: a config error, exit 2
