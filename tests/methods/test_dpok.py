"""DPOK: the loss by hand (policy, KL and value parts), parameter groups, and a reward gain on a small task."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.dpok import DPOKConfig, dpok_loss


def test_dpok_loss_hand_computed():
    log_ratio = torch.tensor([0.0, math.log(2.0)])
    rewards = torch.tensor([1.0, 2.0])
    values = torch.tensor([0.5, 3.0], requires_grad=True)
    kls = torch.tensor([0.1, 0.3])
    total, policy = dpok_loss(log_ratio, rewards, values, kls, beta=2.0, clip_range=0.5, value_coef=0.5)
    # A = (0.5, -1); ratios (1, 2): pair 1 -> -0.5; pair 2 -> max(2, 1.5) = 2; mean 0.75; KL 2 * 0.2 = 0.4
    assert float(policy) == pytest.approx(0.75 + 0.4)
    # value loss mean((0.5-1)^2, (3-2)^2) = 0.625, weighted 0.5
    assert float(total.detach()) == pytest.approx(1.15 + 0.3125)
    total.backward()
    # only the value regression reaches the value network (the advantage uses detached values)
    assert values.grad.tolist() == pytest.approx([0.5 * 2 * (0.5 - 1.0) / 2, 0.5 * 2 * (3.0 - 2.0) / 2])


@pytest.mark.parametrize("kwargs", [{"inner_steps": 0}, {"clip_range": 0.0}, {"value_lr": 0.0}, {"beta": -1.0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DPOKConfig(**kwargs).validate()


def test_dpok_improves_reward_and_trains_its_value_head(train_on_gaussian):
    base, final = train_on_gaussian("dpok", steps=25, **{"method.lr": 3e-3, "method.batch_size": 32,
                                                         "method.pairs_per_step": 160})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
