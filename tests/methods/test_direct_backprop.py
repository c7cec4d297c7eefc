"""DRaFT-K, AlignProp, ReFL: gradients of the truncated chains against finite differences (float64), the +KL
term, the truncation windows, and a reward gain on a small task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError
from sqdf.methods.direct_backprop import (
    AlignProp,
    AlignPropConfig,
    DRaFT,
    DRaFTConfig,
    ReFL,
    ReFLConfig,
    direct_loss,
    run_chain,
)

T, D = 4, 2


class Affine(nn.Module):
    """eps(x, t) = a * x + b, float64."""

    prediction_type = "epsilon"

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.1, -0.2], dtype=torch.float64))

    def forward(self, x, t, cond=None):
        return self.a * x + self.b


def _policy():
    sch = NoiseSchedule(ScheduleConfig(num_train_steps=50), num_inference_steps=T, eta=1.0)
    policy = DiffusionPolicy(Affine(), sch, (D,))
    with torch.no_grad():
        policy.model.a.add_(0.2)  # differ from the reference
    return policy


def _reward(x):
    return -((x - torch.tensor([1.0, -1.0], dtype=x.dtype)) ** 2).sum(1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, D, generator=g, dtype=torch.float64), torch.randn(T, 3, D, generator=g, dtype=torch.float64)


def _loss(policy, grad_from, with_kl, kl_weight, checkpointing=False):
    x, noises = _inputs()
    x_end, kl = run_chain(policy, x, None, noises, T, grad_from, with_kl, checkpointing)
    return direct_loss(_reward(x_end), kl, kl_weight)


def _fd_grad_a(policy, fn, h=1e-6):
    with torch.no_grad():
        policy.model.a.add_(h)
        up = float(fn())
        policy.model.a.sub_(2 * h)
        down = float(fn())
        policy.model.a.add_(h)
    return (up - down) / (2 * h)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kl_weight", [0.0, 0.7])
def test_full_backprop_gradient_matches_finite_differences(kl_weight, checkpointing):
    policy = _policy()
    loss = _loss(policy, 0, kl_weight > 0, kl_weight, checkpointing)
    loss.backward()
    fd = _fd_grad_a(policy, lambda: _loss(policy, 0, kl_weight > 0, kl_weight))
    assert float(policy.model.a.grad) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_truncated_gradient_equals_the_gradient_with_earlier_states_frozen():
    """DRaFT-1: the gradient equals that of r(mean_{T-1}(x_{T-1}) + sigma noise) with x_{T-1} a constant."""
    policy = _policy()
    loss = _loss(policy, T - 1, False, 0.0)
    loss.backward()
    x, noises = _inputs()
    with torch.no_grad():
        x_prev, _ = run_chain(policy, x, None, noises, T - 1, T, False)

    def last_step_loss():
        return -_reward(policy.step_mean(x_prev, T - 1) + policy.sigma(T - 1) * noises[T - 1]).mean()

    assert float(policy.model.a.grad) == pytest.approx(_fd_grad_a(policy, last_step_loss), rel=1e-6)


def test_kl_term_is_the_sum_of_exact_step_kls():
    policy = _policy()
    x, noises = _inputs()
    _, kl = run_chain(policy, x, None, noises, T, T, True)
    state, expected = x, torch.zeros(3, dtype=torch.float64)
    for k in range(T):
        mean, ref = policy.step_mean(state, k), policy.step_mean(state, k, which="reference")
        expected += ((mean - ref) ** 2).sum(1) / (2 * policy.sigma(k) ** 2)
        state = mean + policy.sigma(k) * noises[k]
    assert kl.detach().tolist() == pytest.approx(expected.detach().tolist(), rel=1e-10)


def test_direct_loss_hand_computed():
    assert float(direct_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]), 0.5)) == pytest.approx(-2 + 0.5)
    assert float(direct_loss(torch.tensor([1.0, 3.0]), None, 0.5)) == pytest.approx(-2.0)


def test_truncation_windows():
    policy = _policy()
    g = torch.Generator().manual_seed(0)
    assert DRaFT(DRaFTConfig(k=2), policy, 1.0).window(g) == (T, T - 2)
    windows = {AlignProp(AlignPropConfig(min_k=1), policy, 1.0).window(g) for _ in range(200)}
    assert windows == {(T, T - k) for k in range(1, T + 1)}
    refl = ReFL(ReFLConfig(late_steps=2), policy, 1.0)
    stops = {refl.window(g) for _ in range(100)}
    assert stops == {(T - 2, T - 2), (T - 1, T - 1)}


def test_refl_scores_the_one_step_prediction():
    policy = _policy()
    refl = ReFL(ReFLConfig(), policy, 1.0)
    x, _ = _inputs()
    assert torch.equal(refl.scored(x, 2, None), policy.predict(x, 2)[1])


@pytest.mark.parametrize("cls,kwargs", [(DRaFTConfig, {"k": 0}), (AlignPropConfig, {"min_k": 3, "max_k": 2}),
                                         (ReFLConfig, {"late_steps": 0}), (DRaFTConfig, {"kl_weight": -1.0})])
def test_config_errors(cls, kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        cls(**kwargs).validate()


@pytest.mark.parametrize("method,extra", [("draft", {"method.k": 2}), ("alignprop", {}), ("refl", {}),
                                          ("draft", {"method.k": 10, "method.kl_weight": 0.05, "method.grad_checkpointing": True})])
def test_direct_methods_improve_reward(train_on_gaussian, method, extra):
    base, final = train_on_gaussian(method, steps=25, **{"method.lr": 1e-2, "method.batch_size": 32, **extra})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
