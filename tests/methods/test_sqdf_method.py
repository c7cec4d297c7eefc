"""SQDF: the loss formula, its gradient w.r.t. the policy mean (finite differences, float64), the KL forms,
config validation and one training iteration with a stub context."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sqdf.diffusion.mixture import QuadraticReward
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError
from sqdf.methods.base import IterationContext, Rollout
from sqdf.methods.sqdf import SQDF, SQDFConfig, sqdf_loss

N_TRAIN, T, D = 50, 5, 2


class TinyEps(nn.Module):
    """eps(x, t) = W tanh(x) (1 + t / N) + b, float64; nonlinear so Tweedie's Jacobian is not trivial."""

    prediction_type = "epsilon"

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.2 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        # computes in float64; float32 inputs (policy.sample draws float32 noise) come back as float32
        xx = x.to(self.W.dtype)
        out = (torch.tanh(xx) @ self.W.T) * (1 + t.to(xx.dtype)[:, None] / N_TRAIN) + self.b
        return out.to(x.dtype)


def _policy():
    sch = NoiseSchedule(ScheduleConfig(num_train_steps=N_TRAIN), num_inference_steps=T, eta=1.0)
    policy = DiffusionPolicy(TinyEps(0), sch, (D,))
    with torch.no_grad():  # make the policy differ from its frozen reference
        other = TinyEps(1)
        policy.model.W.copy_(other.W)
        policy.model.b.copy_(other.b)
    return policy


REWARD = QuadraticReward.diagonal([1.0, 0.5], [1.0, -1.0], offset=0.2)


def _pairs(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 2, 3, T - 1][:b])
    noise = torch.randn(b, D, generator=g, dtype=torch.float64)
    return x, k, noise


def _method(**kw):
    cfg = SQDFConfig(**{"batch_size": 4, "buffer_size": 8, "value": "paper", **kw})
    return SQDF(cfg, _policy(), alpha=0.7)


# ---- the loss formula ----------------------------------------------------------------------------------------


def test_sqdf_loss_hand_computed():
    rewards = torch.tensor([1.0, -2.0, 0.5])
    kls = torch.tensor([0.1, 0.2, 0.3])
    steps_to_go = torch.tensor([0, 2, 1])
    loss = sqdf_loss(rewards, kls, steps_to_go, gamma=0.9, alpha=0.5)
    # -mean(0.9^0*1 - 0.05, 0.81*(-2) - 0.1, 0.9*0.5 - 0.15) = -mean(0.95, -1.72, 0.30)
    assert float(loss) == pytest.approx(-(0.95 - 1.72 + 0.30) / 3, rel=1e-6)
    # gamma = 1: no discount
    loss1 = sqdf_loss(rewards, kls, steps_to_go, gamma=1.0, alpha=0.5)
    assert float(loss1) == pytest.approx(-((1 - 0.05) + (-2 - 0.1) + (0.5 - 0.15)) / 3, rel=1e-6)


def _sigma(a_t, a_p):
    return math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))


def _post_mean(eps, x, a_t, a_p):
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    alpha_t = a_t / a_p
    return (math.sqrt(a_p) * (1 - alpha_t) / (1 - a_t)) * x0 + (math.sqrt(alpha_t) * (1 - a_p) / (1 - a_t)) * x


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_pair_loss_matches_independent_computation(gamma):
    method = _method(gamma=gamma)
    policy = method.policy
    x, k, noise = _pairs()
    loss, r, kl = method.pair_loss(x, k, None, noise, REWARD)
    abar = policy.schedule.abar.tolist()
    ts = policy.schedule.timesteps
    terms, rs, kls = [], [], []
    with torch.no_grad():
        for i, ki in enumerate(k.tolist()):
            xi = x[i : i + 1]
            a_t, a_p = abar[ki], abar[ki + 1]
            s = _sigma(a_t, a_p)
            t = torch.tensor([ts[ki]])
            mu = _post_mean(policy.model(xi, t), xi, a_t, a_p)
            mu_ref = _post_mean(policy.reference(xi, t), xi, a_t, a_p)
            x_next = mu + s * noise[i : i + 1]
            if ki + 1 == T:
                x0 = x_next
            else:
                eps_ref = policy.reference(x_next, torch.tensor([ts[ki + 1]]))
                x0 = (x_next - math.sqrt(1 - a_p) * eps_ref) / math.sqrt(a_p)
            ri = float(REWARD(x0))
            kli = float(((mu - mu_ref) ** 2).sum()) / (2 * s * s)
            rs.append(ri)
            kls.append(kli)
            terms.append(gamma ** (T - 1 - ki) * ri - 0.7 * kli)
    torch.testing.assert_close(r.detach(), torch.tensor(rs, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # the policy keeps abar and sigma in float32, so 1 - abar near the clean end carries ~1e-4 relative error
    torch.testing.assert_close(kl.detach(), torch.tensor(kls, dtype=torch.float64), rtol=1e-3, atol=1e-7)
    assert min(kls) > 0
    assert float(loss.detach()) == pytest.approx(-sum(terms) / len(terms), rel=1e-3)


def _patch_mean_offset(policy, delta):
    """Add ``delta`` to the policy's step mean (not the reference's), so that d loss / d delta = d loss / d mean."""
    orig = policy.step_mean

    def step_mean(x, k, cond=None, which="policy"):
        m = orig(x, k, cond, which)
        return m + delta if which == "policy" else m

    policy.step_mean = step_mean


@pytest.mark.parametrize("kl_form", ["exact", "official"])
def test_pair_loss_gradient_wrt_policy_mean_matches_finite_differences(kl_form):
    method = _method(gamma=0.9, kl_form=kl_form)
    x, k, noise = _pairs(seed=1)
    delta = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
    _patch_mean_offset(method.policy, delta)
    loss, _, _ = method.pair_loss(x, k, None, noise, REWARD)
    (grad,) = torch.autograd.grad(loss, delta)

    h = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for j in range(D):
                delta.zero_()
                delta[i, j] = h
                lp = float(method.pair_loss(x, k, None, noise, REWARD)[0])
                delta[i, j] = -h
                lm = float(method.pair_loss(x, k, None, noise, REWARD)[0])
                fd[i, j] = (lp - lm) / (2 * h)
        delta.zero_()
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert float(grad.abs().min()) > 0  # every pair contributes

    # closed form at the last step (x0_hat = x_next): dL/dmu = -(grad r(x_next) - alpha dKL/dmu) / B
    policy = method.policy
    i = x.shape[0] - 1
    assert int(k[i]) == T - 1
    with torch.no_grad():
        mu = policy.step_mean(x, k)[i : i + 1]  # delta is zero here
        mu_ref = policy.step_mean(x, k, which="reference")[i : i + 1]
        s = policy.sigma(T - 1)  # the float32-rounded sigma the policy uses
        x_next = mu + s * noise[i : i + 1]
        grad_r = -(x_next - REWARD.w / torch.diagonal(REWARD.A)) * torch.diagonal(REWARD.A)
        if kl_form == "exact":
            dkl = (mu - mu_ref) / s**2
        else:
            dkl = 2 * (mu - mu_ref) / (s**2 * D)
        expected = -(grad_r - 0.7 * dkl) / x.shape[0]
    torch.testing.assert_close(grad[i : i + 1], expected, rtol=1e-5, atol=1e-8)


def test_pair_loss_parameter_gradient_matches_finite_differences():
    method = _method(gamma=0.8)
    x, k, noise = _pairs(seed=2)
    params = [method.policy.model.W, method.policy.model.b]
    loss, _, _ = method.pair_loss(x, k, None, noise, REWARD)
    grads = torch.autograd.grad(loss, params)
    h = 1e-6
    with torch.no_grad():
        for p, gr in zip(params, grads):
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = float(flat[j])
                flat[j] = old + h
                lp = float(method.pair_loss(x, k, None, noise, REWARD)[0])
                flat[j] = old - h
                lm = float(method.pair_loss(x, k, None, noise, REWARD)[0])
                flat[j] = old
                assert float(gr.view(-1)[j]) == pytest.approx((lp - lm) / (2 * h), rel=1e-5, abs=1e-8)
    # the reference got no gradient
    assert all(p.grad is None for p in method.policy.reference.parameters())


def test_kl_forms():
    exact = _method(kl_form="exact")
    official = _method(kl_form="official")
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4, D, generator=g, dtype=torch.float64)
    ref = torch.randn(4, D, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 1, 3, 4])
    sig = exact.policy.schedule.sigmas[k]  # float64 from the schedule
    expected_official = (((mean - ref) / sig[:, None]) ** 2).mean(1)
    expected_exact = ((mean - ref) ** 2).sum(1) / (2 * sig**2)
    torch.testing.assert_close(official.step_kl(mean, ref, k), expected_official, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exact.step_kl(mean, ref, k), expected_exact, rtol=1e-6, atol=1e-9)


def test_config_alpha_overrides_task_alpha():
    assert _method().alpha == 0.7
    assert _method(alpha=0.25).alpha == 0.25


# ---- config validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gamma=0.0),
        dict(gamma=-0.5),
        dict(gamma=1.01),
        dict(alpha=0.0),
        dict(alpha=-1.0),
        dict(batch_size=64, buffer_size=32),
        dict(sampling="prioritized"),
        dict(kl_form="half"),
        dict(estimator="magic"),
        dict(replay_ratio=0),
        dict(train_batch_size=0),
        dict(batch_size=0),
        dict(lr=0.0),
    ],
)
def test_config_validate_raises(kwargs):
    cfg = SQDFConfig(**kwargs)
    with pytest.raises(ConfigError):
        cfg.validate()
    with pytest.raises(ConfigError):
        SQDF(cfg, _policy(), alpha=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(gamma=1.0), dict(alpha=1e-3), dict(batch_size=8, buffer_size=8), dict(sampling="on_policy"),
     dict(sampling="random"), dict(kl_form="official")],
)
def test_config_validate_accepts(kwargs):
    SQDFConfig(**kwargs).validate()


# ---- one iteration with a stub context -----------------------------------------------------------------------


def test_train_iteration_fills_buffer_and_steps():
    method = _method(gamma=0.9, replay_ratio=2, sampling="random")
    policy = method.policy
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-2)
    calls = {"rollout": 0, "step": 0}

    def rollout(n):
        calls["rollout"] += 1
        traj = policy.sample(n, generator=torch.Generator().manual_seed(calls["rollout"]))
        return Rollout(traj, REWARD(traj.samples))

    def optimizer_step(loss):
        calls["step"] += 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"grad_norm": 1.0}

    before = policy.model.W.detach().clone()
    ctx = IterationContext(0, torch.Generator().manual_seed(0), rollout, lambda x, c=None: REWARD(x), optimizer_step)
    out = method.train_iteration(ctx)
    assert calls == {"rollout": 1, "step": 2}
    assert out["buffer_size"] == 4
    assert math.isfinite(out["loss"]) and out["step_kl"] > 0
    assert not torch.equal(before, policy.model.W.detach())
    state = method.state_dict()
    fresh = _method()
    fresh.load_state_dict(state)
    assert len(fresh.buffer) == 4


def test_sqdf_improves_reward_toward_the_optimum(train_on_gaussian):
    # lr 3e-3 x 40 iterations: every seed 0-3 lands at regret 0.27-0.37 (lr 1e-2 x 25 scattered 0.3-0.95)
    base, final = train_on_gaussian("sqdf", steps=40, **{"method.lr": 3e-3, "method.batch_size": 64,
                                                         "method.gamma": 1.0})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
    assert final["regret"] < base["regret"] - 0.2
