"""SQDF's soft values: the Monte Carlo value's limits, the critic's fit to soft returns, the exact value on a toy
task, query accounting, resume of the critic, and the default (critic) improving a small task."""

from __future__ import annotations

import json

import pytest
import torch

from sqdf.diffusion.estimators import make_estimator, reference_chain_x0
from sqdf.methods.base import IterationContext, Rollout
from sqdf.methods.replay_buffer import ReplayBuffer
from sqdf.methods.sqdf import SQDF, SQDFConfig, SQDFPaperConfig
from sqdf.methods.sqdf_values import CriticValue, MonteCarloValue
from sqdf.training.run_setup import build_policy, default_config, make_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian(steps: int = 20):
    config = default_config("sqdf", "gaussian")
    config.update({"task": {"num_inference_steps": steps}})
    task = make_task("gaussian", config.task)
    return task, build_policy(task, config, None, torch.device("cpu"))


def test_reference_chain_with_one_step_is_tweedie_and_final_states_pass_through():
    task, policy = _gaussian()
    x = torch.randn(5, 2)
    k = torch.tensor([3, 7, 10, 19, 20])
    torch.testing.assert_close(reference_chain_x0(policy, x, k, None, 1, []), make_estimator("tweedie")(policy, x, k))
    out = reference_chain_x0(policy, x, k, None, 4, [torch.randn(5, 2) for _ in range(3)])
    torch.testing.assert_close(out[-1], x[-1])


def test_monte_carlo_value_tends_to_the_exact_soft_value_as_chains_refine():
    # Gaussian base, linear reward, exact-score reference: long reference chains sample p_ref(x0 | x_t), and
    # alpha log mean_j exp(r(x0_j)/alpha) tends to V* = alpha log E[exp(r/alpha) | x_t] (closed form)
    task, policy = _gaussian(steps=20)
    k = torch.full((8,), 10)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    v_star = task.soft_value(x.double(), policy._timesteps[k]).float()
    errors = []
    for m, steps in ((1, 1), (512, 5), (2048, 20), (8192, 200)):  # the chain's error is O(1 / steps)
        g = torch.Generator().manual_seed(1)
        value = MonteCarloValue(task.alpha, m, steps)
        v, queries = value(policy, x, k, None, task.reward, g)
        assert queries == 8 * m
        errors.append(float((v - v_star).abs().max()))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5 and errors[-1] < 0.04
    g = torch.Generator().manual_seed(1)
    final, _ = MonteCarloValue(task.alpha, 3, 4)(policy, x, torch.full((8,), 20), None, task.reward, g)
    torch.testing.assert_close(final, task.reward(x))  # at the last step V = r(x') exactly


def test_critic_fits_the_buffers_soft_returns():
    task, policy = _gaussian(steps=5)
    buffer = ReplayBuffer(64, 5)
    traj = policy.sample(64, generator=torch.Generator().manual_seed(0))
    buffer.add(traj.states, task.reward(traj.samples), None, traj.kls + 0.1)
    returns = buffer.returns(alpha=0.5)
    torch.testing.assert_close(returns[:, -1], buffer.rewards)
    torch.testing.assert_close(returns[:, 0], buffer.rewards - 0.5 * (traj.kls + 0.1).sum(1), check_dtype=False)
    torch.testing.assert_close(returns[:, 2], buffer.rewards - 0.5 * (traj.kls[:, 2:] + 0.1).sum(1),
                               check_dtype=False)
    # chains that stand still at a point x: the return from every state is r(x) - 0.5 * 0.1 * (steps to go), a
    # deterministic function of (x, t) that the critic must fit
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 2
    buffer = ReplayBuffer(64, 5)
    buffer.add(x[:, None].expand(64, 6, 2).clone(), task.reward(x), None, torch.full((64, 5), 0.1))
    returns = buffer.returns(alpha=0.5)
    critic = CriticValue(policy, make_estimator("tweedie"), 0.5, hidden=64, layers=2, lr=3e-3, x0_input=True,
                         num_train_steps=1000)
    g = torch.Generator().manual_seed(0)
    first = critic.fit(policy, buffer, 1, 256, g, 10.0)
    last = critic.fit(policy, buffer, 300, 256, g, 10.0)
    assert last < 0.1 * first
    ks = torch.arange(6).repeat(64)
    idx = torch.arange(64).repeat_interleave(6)
    pred, _ = critic(policy, buffer.states[idx, ks], ks, None, None)
    rel = ((pred - returns[idx, ks]) ** 2).mean() / returns.var()
    assert rel < 0.1
    assert not any(p.requires_grad for p in critic.net.parameters())  # frozen for the policy's loss


def _context(policy, reward, seed=0):
    calls = {"queries": 0, "steps": 0}
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)

    def rollout(n):
        traj = policy.sample(n, generator=torch.Generator().manual_seed(seed + calls["steps"]))
        calls["queries"] += n
        return Rollout(traj, reward(traj.samples))

    def counted(x, cond=None):
        calls["queries"] += x.shape[0]
        return reward(x, cond)

    def step(loss):
        calls["steps"] += 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"grad_norm": 0.0}

    return IterationContext(0, torch.Generator().manual_seed(seed), rollout, counted, step), calls


@pytest.mark.parametrize("value, per_pair", [("paper", 1), ("mc", 3), ("critic", 0), ("exact", 0)])
def test_queries_per_iteration(value, per_pair):
    task, policy = _gaussian(steps=5)
    if value == "exact":
        policy.attach_soft_value(task.soft_value)
    cfg = SQDFConfig(batch_size=4, buffer_size=8, value=value, replay_ratio=2, train_batch_size=6, mc_samples=3,
                     critic_warmup=0, critic_steps=1, critic_batch_size=8)
    method = SQDF(cfg, policy, task.alpha)
    ctx, calls = _context(policy, task.reward)
    method.train_iteration(ctx)
    # mc: pairs at the last step cost 3 queries too (their 3 "chains" are the state itself)
    assert calls == {"queries": 4 + 2 * 6 * per_pair, "steps": 2}


def test_critic_warmup_fits_only_and_state_round_trips():
    task, policy = _gaussian(steps=5)
    cfg = SQDFConfig(batch_size=4, buffer_size=8, critic_warmup=1, critic_steps=2, critic_batch_size=8,
                     train_batch_size=4, replay_ratio=1)
    method = SQDF(cfg, policy, task.alpha)
    ctx, calls = _context(policy, task.reward)
    out = method.train_iteration(ctx)
    assert calls["steps"] == 0 and "critic_loss" in out and "loss" not in out
    method.train_iteration(ctx)
    assert calls["steps"] == 1
    fresh = SQDF(SQDFConfig(**{**cfg.__dict__}), _gaussian(steps=5)[1], task.alpha)
    fresh.load_state_dict(method.state_dict())
    assert fresh.iterations == 2
    for a, b in zip(method.value.net.state_dict().values(), fresh.value.net.state_dict().values()):
        assert torch.equal(a, b)


def test_paper_config_is_the_published_setting_and_black_box_rules():
    paper = SQDFPaperConfig()
    assert (paper.value, paper.gamma, paper.sampling, paper.replay_ratio) == ("paper", 0.9, "reward_gamma_per", 1)
    assert SQDF.reward_gradient_needed(SQDFConfig(value="paper"))
    assert SQDF.reward_gradient_needed(SQDFConfig(value="mc"))
    assert not SQDF.reward_gradient_needed(SQDFConfig())  # the critic reads rollout rewards only


def test_exact_value_needs_a_task_that_has_one():
    from sqdf.errors import ConfigError

    config = default_config("sqdf", "digits")
    config.update({"method": {"value": "exact"}})
    with pytest.raises(ConfigError, match="method.value=exact needs"):
        build_policy(make_task("digits", config.task), config, None, torch.device("cpu"))


def test_default_sqdf_improves_a_mixture_task(tmp_path):
    from sqdf.training.trainer import Trainer

    config = default_config("sqdf", "gmm2")
    config.update({"trainer": {"steps": 30, "eval_samples": 512, "eval_every": 0, "plots": False, "tensorboard": False,
                               "progress": False, "floor": False, "seed": 0},
                   "task": {"num_inference_steps": 20}})
    summary = Trainer("gmm2", "sqdf", config, str(tmp_path / "run")).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    base = rows[0]["regret"]
    assert summary["regret"] < 0.5 * base
