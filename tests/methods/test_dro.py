"""DRO: the loss by hand, and a Gaussian-task run that moves toward p* with pointwise scores only."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.dro import DROConfig, dro_loss


def test_dro_loss_hand_computed_and_its_gradient():
    r = torch.tensor([1.0, -1.0])
    v = torch.tensor([0.5, 0.0], requires_grad=True)
    h = torch.tensor([0.2, -0.4], requires_grad=True)
    loss = dro_loss(r, v, h, beta=2.0)
    # residuals r - v - 2h: 1 - 0.5 - 0.4 = 0.1, -1 - 0 + 0.8 = -0.2
    assert float(loss) == pytest.approx(0.5 * (0.1**2 + 0.2**2) / 2)
    loss.backward()
    torch.testing.assert_close(h.grad, torch.tensor([-2 * 0.1 / 2, 2 * 0.2 / 2]))
    torch.testing.assert_close(v.grad, torch.tensor([-0.1 / 2, 0.2 / 2]))


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"log_ratio": "x"}, {"inner_steps": 0}, {"value_lr": 0.0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DROConfig(**kwargs).validate()


def test_dro_improves_reward_without_pairs(train_on_gaussian):
    base, final = train_on_gaussian("dro", steps=25, **{"method.lr": 3e-3, "method.batch_size": 32})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
    assert final["path_kl"] < 5.0
