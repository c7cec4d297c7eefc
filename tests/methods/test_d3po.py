"""D3PO: the loss by hand, shared start noise within a pair, and a toy run that moves toward p*."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.d3po import D3POConfig, d3po_loss


def test_d3po_loss_hand_computed():
    h_a = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    h_b = torch.tensor([[0.0, 0.1], [0.2, 0.3]])
    labels = torch.tensor([1.0, 0.0])
    loss, margins = d3po_loss(h_a, h_b, labels, beta=2.0)
    torch.testing.assert_close(margins, 2 * (h_a - h_b))
    sp = lambda v: math.log(1 + math.exp(-v))  # noqa: E731  -log sigmoid(v)
    pair0 = sp(0.2) + sp(-0.6)  # a won: -log sigmoid(m)
    pair1 = sp(0.4) + sp(0.0)  # b won: -log sigmoid(-m)
    assert float(loss) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)
    # the official clamp: ratios to the reference within [0.9, 1.1]; outside, no gradient
    h = torch.tensor([[0.5]], requires_grad=True)
    loss, _ = d3po_loss(h, torch.zeros(1, 1), torch.tensor([1.0]), beta=1.0, ratio_clip=0.1)
    loss.backward()
    assert float(h.grad) == 0.0 and float(loss) == pytest.approx(sp(math.log(1.1)))
    tie, _ = d3po_loss(h_a, h_b, torch.tensor([0.5, 0.5]), beta=1.0)
    assert float(tie) == 0.0


@pytest.mark.parametrize("kwargs", [{"batch_size": 7}, {"beta": 0.0}, {"label_temperature": -1.0},
                                    {"log_ratio": "avg"}, {"ratio_clip": 1.5}, {"inner_steps": 0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        D3POConfig(**kwargs).validate()


def test_pairs_share_start_noise_and_d3po_improves_reward(train_on_gaussian, monkeypatch):
    from sqdf.diffusion.policy import DiffusionPolicy

    starts = []
    original = DiffusionPolicy.sample

    def spy(self, n, cond=None, generator=None, which="policy", with_reference=True, initial=None):
        traj = original(self, n, cond, generator, which, with_reference, initial)
        if initial is not None:
            starts.append(traj.states[:, 0].clone())
        return traj

    monkeypatch.setattr(DiffusionPolicy, "sample", spy)
    base, final = train_on_gaussian("d3po", steps=25, **{"method.lr": 3e-3, "method.batch_size": 32,
                                                         "method.label_temperature": 0.0})  # perfect labels
    assert starts and all(torch.equal(s[0::2], s[1::2]) for s in starts)
    assert not torch.equal(starts[0][0], starts[0][2])
    assert final["reward_mean"] > base["reward_mean"] + 0.3
    assert final["reward_queries"] == 25 * 32
