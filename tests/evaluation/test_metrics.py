"""Sample-set metrics against closed forms: Gaussian energy distances, entropies and KLs, log-mean-exp."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.evaluation.metrics import (
    energy_distance, knn_entropy, log_mean_exp, mean_and_stderr, mode_weights, objective_terms, sample_kl,
    spread_ratio, total_variation,
)


def _normal(n, d, seed, mean=0.0, std=1.0):
    return mean + std * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _abs_normal_mean(mu: float, sigma: float) -> float:
    """E|Z| for Z ~ N(mu, sigma^2) (folded normal)."""
    phi = 0.5 * (1 + math.erf(-mu / (sigma * math.sqrt(2))))
    return sigma * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * sigma**2)) + mu * (1 - 2 * phi)


def test_energy_distance_of_two_1d_gaussians_matches_the_closed_form():
    mu = 1.5
    x, y = _normal(3000, 1, 0), _normal(3000, 1, 1, mean=mu)
    # X - Y ~ N(-mu, 2); X - X' ~ N(0, 2)
    exact = 2 * _abs_normal_mean(mu, math.sqrt(2)) - 2 * _abs_normal_mean(0.0, math.sqrt(2))
    assert energy_distance(x, y) == pytest.approx(exact, abs=0.05)
    assert abs(energy_distance(x, _normal(3000, 1, 2))) < 0.02  # equal laws: about 0


def test_knn_entropy_of_a_gaussian_matches_half_log_det_2_pi_e_sigma():
    std = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x = _normal(4000, 2, 3) * std
    exact = 0.5 * math.log((2 * math.pi * math.e) ** 2 * float(std.prod() ** 2))
    assert knn_entropy(x) == pytest.approx(exact, abs=0.05)
    with pytest.raises(ValueError, match="more than k=5"):
        knn_entropy(x[:5])


def test_sample_kl_between_unit_gaussians_is_half_the_squared_mean_gap():
    x = _normal(4000, 1, 4)
    log_p = -0.5 * (x[:, 0] - 1.0) ** 2 - 0.5 * math.log(2 * math.pi)  # p = N(1, 1), q = N(0, 1)
    assert sample_kl(x, log_p) == pytest.approx(0.5, abs=0.05)


def test_log_mean_exp_of_standard_normal_values_is_one_half():
    v = _normal(20000, 1, 5)[:, 0]
    value, se = log_mean_exp(v)
    assert value == pytest.approx(0.5, abs=4 * se + 1e-3)
    assert log_mean_exp(torch.full((4,), 1000.0))[0] == pytest.approx(1000.0)  # no overflow


def test_objective_terms_mode_weights_and_total_variation_by_hand():
    terms = objective_terms(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), alpha=2.0)
    assert terms["reward_mean"] == 2.0 and terms["path_kl"] == 0.5 and terms["objective"] == 1.0
    # J per sample = [0, 2]: sample sd sqrt(2), standard error sqrt(2) / sqrt(2) = 1
    assert terms["objective_stderr"] == pytest.approx(1.0) and terms["path_kl_stderr"] == 0.0
    w = mode_weights(torch.tensor([0, 0, 2, 1]), 4)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    assert total_variation(w, torch.tensor([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.25)
    mean, se = mean_and_stderr(torch.tensor([2.0]))
    assert mean == 2.0 and math.isnan(se)


def test_spread_ratio_is_the_ratio_of_standard_deviations():
    x, y = _normal(4000, 3, 6, std=1.5), _normal(4000, 3, 7)
    assert spread_ratio(x, y) == pytest.approx(1.5, rel=0.03)
    assert spread_ratio(y, y) == 1.0
