"""PRDP: pairs inside groups, the proximal loss by hand, and a reward gain on a small task."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.prdp import PRDPConfig, pair_indices, prdp_loss


def test_pair_indices_stay_inside_groups():
    a, b = pair_indices(2, 3)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]


def test_prdp_loss_hand_computed():
    # 2 chains, 2 steps; per-step log-ratios now and at sampling time
    now = torch.tensor([[0.3, 0.05], [0.0, -0.2]], requires_grad=True)
    old = torch.zeros(2, 2)
    rewards = torch.tensor([2.0, 1.0])
    pairs = (torch.tensor([0]), torch.tensor([1]))
    # unclipped: r_hat = (0.35, -0.2); pred 0.55; target (2-1)/2 = 0.5 -> err 0.0025
    # clipped at eps 0.1: (0.1, 0.05) and (0.0, -0.1) -> r_hat (0.15, -0.1); pred 0.25 -> err 0.0625 = the max
    loss = prdp_loss(now, old, rewards, pairs, beta=2.0, clip_eps=0.1)
    assert float(loss.detach()) == pytest.approx(0.0625)
    loss.backward()
    # the clipped branch is active: only unclipped entries carry gradient, d loss / d pred = 2 (0.25 - 0.5)
    assert now.grad.flatten().tolist() == pytest.approx([0.0, -0.5, 0.5, 0.0])
    mean = prdp_loss(now.detach(), old, rewards, pairs, beta=2.0, clip_eps=10.0, reduction="mean")
    assert float(mean) == pytest.approx((0.175 - (-0.1) - 0.5) ** 2)


@pytest.mark.parametrize("kwargs", [{"group_size": 1}, {"group_size": 5}, {"inner_steps": 0}, {"clip_eps": 0.0},
                                    {"reduction": "max"}, {"beta": 0.0}])
def test_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs)) if "group_size" not in kwargs else "group_size"):
        PRDPConfig(batch_size=64, **kwargs).validate()


def test_prdp_improves_reward(train_on_gaussian):
    base, final = train_on_gaussian("prdp", steps=15, **{"method.lr": 3e-3, "method.batch_size": 32,
                                                         "method.inner_steps": 4, "method.clip_eps": 0.1})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
