"""Bradley-Terry labels and the logistic preference loss, against hand computations."""

from __future__ import annotations

import math

import torch

from sqdf.preferences.labels import bradley_terry_labels, preference_loss


def test_bradley_terry_frequencies_match_the_sigmoid():
    n = 200_000
    r_a, r_b = torch.full((n,), 1.0), torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    for tau in (0.5, 1.0, 2.0):
        freq = float(bradley_terry_labels(r_a, r_b, tau, g).mean())
        assert abs(freq - 1 / (1 + math.exp(-1 / tau))) < 4e-3
    det = bradley_terry_labels(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), 0.0)
    assert det.tolist() == [1.0, 0.0, 0.5]


def test_preference_loss_hand_computed_and_ties_carry_nothing():
    m = torch.tensor([0.0, 2.0, -1.0, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 0.5])
    loss = preference_loss(m, y)
    expected = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), 0.0]
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.sum().backward()
    assert float(m.grad[3]) == 0.0 and float(m.grad[0]) == -0.5
