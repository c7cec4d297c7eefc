"""Score as Action: advantages and the loss by hand, the trust region's KL, the policy gradient at the sampling
policy on a 1-D toy, the value boundary, config errors, exact resume and an objective gain on a small task."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from sqdf.diffusion.mixture import GaussianMixture
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig, gaussian_kl
from sqdf.diffusion.sde import em_mean, sample_sde
from sqdf.errors import ConfigError
from sqdf.methods.score_as_action import (
    KL_COEF_RANGE,
    ScoreAsAction,
    ScoreAsActionConfig,
    adapt_kl_coef,
    score_as_action_loss,
    soft_returns,
    td_advantages,
)
from sqdf.models.denoisers import MixtureScoreDenoiser, MLPDenoiser, ResidualDenoiser

N = 200


def _policy(seed=0, perturb=0.0) -> DiffusionPolicy:
    """Exact N(0, I) base in 2-D plus an MLP correction (zero at start unless perturbed)."""
    schedule = NoiseSchedule(ScheduleConfig(num_train_steps=N), num_inference_steps=8)
    base = GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None],
                           torch.ones(1, dtype=torch.float64))
    torch.manual_seed(seed)
    corr = MLPDenoiser(2, hidden=16, num_layers=2, time_dim=8, zero_init=True, num_train_steps=N)
    policy = DiffusionPolicy(ResidualDenoiser(MixtureScoreDenoiser(base, schedule.alphas_cumprod), corr), schedule,
                             (2,), reference=MixtureScoreDenoiser(base, schedule.alphas_cumprod))
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in corr.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return policy


# ---- pure pieces, by hand --------------------------------------------------------------------------------------
def test_soft_returns_and_gae_advantages_by_hand():
    rewards, kls = torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3]])
    assert soft_returns(rewards, kls, alpha=2.0).tolist()[0] == pytest.approx([0.8, 1.0, 1.4])
    values = torch.tensor([[0.5, 0.9, 1.2, 2.0]])  # the last entry is V(t_T, x_T) = r
    # delta_k = V_{k+1} - V_k - alpha kl_k = (0.2, -0.1, 0.2)
    assert td_advantages(values, kls, 2.0, 0.0).tolist()[0] == pytest.approx([0.2, -0.1, 0.2])
    assert td_advantages(values, kls, 2.0, 0.5).tolist()[0] == pytest.approx([0.2, 0.0, 0.2], abs=1e-6)
    # lambda = 1: the Monte-Carlo soft return minus the value
    lam1 = td_advantages(values, kls, 2.0, 1.0)
    torch.testing.assert_close(lam1, soft_returns(rewards, kls, 2.0) - values[:, :-1])


def test_loss_by_hand():
    """One chain, two 1-D steps: L = sum_k [-ratio_k A_k + alpha kl_ref_k + coef kl_old_k]."""
    inc = torch.tensor([0.25, 0.04], dtype=torch.float64)
    scores = torch.tensor([[[1.0], [2.0]]])
    old, ref = torch.tensor([[[0.5], [2.0]]]), torch.tensor([[[0.0], [1.0]]])
    z, adv = torch.tensor([[[1.0], [-1.0]]]), torch.tensor([[1.0, 3.0]])
    loss, parts = score_as_action_loss(scores, old, ref, z, inc, adv, alpha=2.0, kl_coef=4.0)
    # step 0: d = 0.5, log ratio = sqrt(.25) * 1 * .5 - .5 * .25 * .25 = 0.21875; step 1: d = 0, ratio 1
    policy = -(math.exp(0.21875) * 1.0 + 3.0)
    kl_ref = 0.5 * 0.25 * 1.0 + 0.5 * 0.04 * 1.0
    kl_old = 0.5 * 0.25 * 0.25
    assert float(parts["policy"]) == pytest.approx(policy)
    assert float(parts["kl_ref"]) == pytest.approx(kl_ref)
    assert float(parts["kl_old"]) == pytest.approx(kl_old)
    assert float(loss) == pytest.approx(policy + 2.0 * kl_ref + 4.0 * kl_old)


def test_adaptive_coefficient_doubles_halves_and_stays_in_range():
    assert adapt_kl_coef(1.0, 0.031, 0.02) == 2.0
    assert adapt_kl_coef(1.0, 0.013, 0.02) == 0.5
    assert adapt_kl_coef(1.0, 0.02, 0.02) == 1.0
    assert adapt_kl_coef(KL_COEF_RANGE[0], 0.0, 0.02) == KL_COEF_RANGE[0]
    assert adapt_kl_coef(KL_COEF_RANGE[1], 1.0, 0.02) == KL_COEF_RANGE[1]


def test_gradient_at_the_sampling_policy_is_the_policy_gradient_estimator():
    """1-D toy action a_theta(x) = th0 + th1 x at stored states: at theta = theta_old the loss's gradient is
    -mean_b sum_k sqrt(B_k) z_k A_k grad a + alpha mean_b sum_k B_k (a - a_ref) grad a (the KL_old term has zero
    gradient there)."""
    g = torch.Generator().manual_seed(0)
    b, T = 5, 4
    x = torch.randn(b, T, 1, generator=g, dtype=torch.float64)
    z = torch.randn(b, T, 1, generator=g, dtype=torch.float64)
    ref = torch.randn(b, T, 1, generator=g, dtype=torch.float64)
    adv = torch.randn(b, T, generator=g, dtype=torch.float64)
    inc = torch.tensor([0.5, 0.2, 0.05, 0.01], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    scores = theta[0] + theta[1] * x
    alpha = 1.5
    loss, _ = score_as_action_loss(scores, scores.detach(), ref, z, inc, adv, alpha, kl_coef=10.0)
    (grad,) = torch.autograd.grad(loss, theta)
    features = torch.cat([torch.ones_like(x), x], -1)  # d a / d theta, [b, T, 2]
    w = (-inc.sqrt()[None, :] * z[..., 0] * adv + alpha * inc[None, :] * (scores.detach() - ref)[..., 0])
    by_hand = (w[..., None] * features).sum(1).mean(0)
    torch.testing.assert_close(grad, by_hand)


# ---- against the policy --------------------------------------------------------------------------------------
def _method(policy, **kwargs) -> ScoreAsAction:
    return ScoreAsAction(ScoreAsActionConfig(batch_size=6, **kwargs), policy, alpha=1.0)


def test_at_the_sampling_policy_the_ratio_is_one_kl_old_is_zero_and_kl_ref_is_the_path_kl():
    policy = _policy(perturb=0.5)
    method = _method(policy)
    path = sample_sde(policy, 6, generator=torch.Generator().manual_seed(0), timesteps=method.time_grid(None))
    assert float(path.path_kl.mean()) > 1e-3  # policy and reference differ
    chains = torch.arange(6)
    scores = method._policy_scores(path, chains)
    torch.testing.assert_close(scores, path.scores, rtol=1e-5, atol=1e-5)
    adv = torch.randn(6, path.increments.shape[0])
    _, parts = score_as_action_loss(scores, path.scores, path.ref_scores, path.noises, path.increments, adv, 1.0, 1.0)
    assert float(parts["log_ratio_abs"]) < 1e-5
    assert float(parts["kl_old"]) < 1e-9
    assert float(parts["kl_ref"]) == pytest.approx(float(path.path_kl.mean()), rel=1e-5)


def test_kl_old_is_the_exact_kl_between_the_em_path_measures_of_two_policies():
    old = _policy(perturb=0.3)
    new = _policy(perturb=0.3)
    with torch.no_grad():
        for p in new.model.correction.parameters():
            p.add_(0.05)
    path = sample_sde(old, 6, generator=torch.Generator().manual_seed(1))
    method = _method(new)
    kl_old = method._kl_to_sampler(path, chunk=4)
    exact = 0.0  # sum over steps of KL(N(m_new, B I) || N(m_old, B I)) at the visited states
    with torch.no_grad():
        for k in range(len(path.timesteps) - 1):
            x, b = path.states[:, k], float(path.increments[k])
            m_new = em_mean(x, new.score_at(x, path.timesteps[k]), b)
            m_old = em_mean(x, path.scores[:, k], b)
            exact += gaussian_kl(m_new, math.sqrt(b), m_old, math.sqrt(b))
    assert kl_old == pytest.approx(float(exact.mean()), rel=1e-4)
    assert kl_old > 1e-4


@pytest.mark.parametrize("design", ["tweedie", "mlp"])
def test_value_boundary_is_the_reward_and_tweedie_value_starts_exact_for_linear_rewards(design):
    policy = _policy()
    method = _method(policy, value_design=design)
    w = torch.tensor([1.0, -0.5])
    reward = lambda x, cond=None: x @ w  # noqa: E731
    with torch.no_grad():
        for p in method.value.parameters():
            p.add_(0.3)  # any h
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method.value_at(x, 0, None, reward), reward(x))
    if design == "tweedie":  # with h = 0, V(t, x) = w . E[x_0 | x_t], the exact value of the reference
        with torch.no_grad():
            for p in method.value.parameters():
                p.zero_()
        a_t, a_0 = float(policy.schedule.alphas_cumprod[120]), float(policy.schedule.alphas_cumprod[0])
        rho = a_t / a_0
        exact = math.sqrt(rho) / (rho + 1 - rho) * (x @ w)  # data N(0, v_0 I) with v_0 = 1
        torch.testing.assert_close(method.value_at(x, 120, None, reward), exact, rtol=1e-4, atol=1e-5)


def test_random_grids_and_generation():
    policy = _policy()
    method = _method(policy, time_grid="random", num_steps=5)
    ts = method.time_grid(torch.Generator().manual_seed(0))
    assert len(ts) == 6 and ts[0] == N - 1 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    gen = method.generate(5, None, torch.Generator().manual_seed(0), None)
    assert gen.samples.shape == (5, 2) and gen.path_kl.shape == (5,)
    assert gen.kl_note == "Girsanov sum along the EM path"
    assert "ode-heun" in _method(policy, eval_solver="ode-heun").generate(3, None, None, None).kl_note


@pytest.mark.parametrize("kwargs", [{"num_steps": -1}, {"time_grid": "adaptive"}, {"num_inner_epochs": 0},
                                    {"num_minibatches": 100}, {"gae_lambda": 1.5}, {"kl_target": 0.0},
                                    {"kl_coef_init": 0.0}, {"kl_stop_factor": -1.0}, {"value_design": "q"},
                                    {"value_lr": 0.0}, {"value_epochs": 0}, {"eval_solver": "rk4"},
                                    {"alpha": 0.0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ScoreAsActionConfig(batch_size=16, **kwargs).validate()


def test_too_many_steps_flow_schedules_and_unstable_em_steps_are_refused():
    with pytest.raises(ConfigError, match="num_steps=200"):
        _method(_policy(), num_steps=N)
    flow = DiffusionPolicy(MLPDenoiser(2, hidden=8, num_layers=1, time_dim=8), FlowMatchSchedule(4), (2,))
    with pytest.raises(ConfigError, match="VP schedules"):
        _method(flow)
    # a cosine schedule clips its final betas at 0.999: its first EM step integrates beta over B = 14.7
    cosine = DiffusionPolicy(MLPDenoiser(2, hidden=8, num_layers=1, time_dim=8),
                             NoiseSchedule(ScheduleConfig(kind="cosine"), num_inference_steps=20), (2,))
    with pytest.raises(ConfigError, match="B = 14.7 > 4"):
        _method(cosine)


# ---- through the Trainer ---------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    from sqdf.cli import main

    args = ["--method", "score-as-action", "--seed", "4", "--set", "trainer.progress=false",
            "--set", "trainer.device=cpu", "--set", "trainer.eval_samples=64", "--set", "task.num_inference_steps=6",
            "--set", "method.batch_size=8", "--set", "method.time_grid=random", "--set", "method.num_minibatches=2",
            "--set", "trainer.checkpoint_every=2", "--set", "trainer.eval_every=2", "--set", "trainer.plots=false",
            "--set", "trainer.tensorboard=false", "--set", "trainer.floor=false", "--set", "method.kl_target=0.001"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "gaussian", "--steps", "4", "--out", str(full), *args]) == 0
    assert main(["train", "gaussian", "--steps", "2", "--out", str(part), *args]) == 0
    assert main(["resume", str(part), "--steps", "4"]) == 0

    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"} for line in fh]

    a, b = rows(full), rows(part)
    assert len(a) == 4 + 3 and a == b
    assert len({r["kl_coef"] for r in a if r["kind"] == "train"}) > 1  # the adaptive coefficient moved
    sa = torch.load(full / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    assert sa["method"]["kl_coef"] == sb["method"]["kl_coef"]
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key in sa["method"]["value"]:
        assert torch.equal(sa["method"]["value"][key], sb["method"]["value"][key]), key


def test_improves_reward_and_objective(train_on_gaussian):
    base, final = train_on_gaussian("score-as-action", steps=20, **{"method.batch_size": 32})
    assert final["reward_mean"] > base["reward_mean"] + 0.8
    assert final["objective"] > base["objective"] + 0.5  # J* = 0.625, the base has J = 0 (0.65-0.72 on seeds 0-2)
    assert final["kl_note"] == "Girsanov sum along the EM path"
