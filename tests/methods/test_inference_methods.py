"""Best-of-N and FK steering: their closed forms (best-of-N KL, telescoping potentials), resampling inside
groups, honest query counts, and a reward gain over the base sampler."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.best_of_n import best_of_n_kl, pick_best
from sqdf.methods.fk_steering import FKSteeringConfig, initial_statistic, potential_log_weights, resample_indices


def test_best_of_n_kl_closed_form_and_monte_carlo():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    # Monte Carlo: best of n standard normals has density n F^(n-1) phi, so KL = E[log(n F(X)^(n-1))]
    n = 4
    x = torch.randn(200_000, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).max(1).values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert float((math.log(n) + (n - 1) * torch.log(cdf)).mean()) == pytest.approx(best_of_n_kl(n), abs=0.01)


def test_pick_best_per_group():
    assert pick_best(torch.tensor([0.1, 0.5, -1.0, 3.0, 2.0, 2.5]), 3).tolist() == [1, 3]


def test_difference_potentials_telescope_to_the_final_reward():
    g = torch.Generator().manual_seed(0)
    rs = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4)]
    stat = initial_statistic("difference", 5, "cpu", torch.float64)
    total = torch.zeros(5, dtype=torch.float64)
    for r in rs:
        log_w, stat = potential_log_weights("difference", r, stat, 0.5)
        total += log_w
    assert total.tolist() == pytest.approx((0.5 * rs[-1]).tolist())


def test_max_and_sum_potentials():
    stat = initial_statistic("max", 2, "cpu", torch.float64)
    lw, stat = potential_log_weights("max", torch.tensor([1.0, -1.0], dtype=torch.float64), stat, 2.0)
    lw, stat = potential_log_weights("max", torch.tensor([0.0, 0.5], dtype=torch.float64), stat, 2.0)
    assert lw.tolist() == [2.0, 1.0]
    stat = initial_statistic("sum", 1, "cpu", torch.float64)
    for r in (1.0, 2.0):
        lw, stat = potential_log_weights("sum", torch.tensor([r], dtype=torch.float64), stat, 1.0)
    assert lw.tolist() == [3.0]


def test_resampling_stays_inside_groups_and_follows_weights():
    g = torch.Generator().manual_seed(0)
    log_w = torch.tensor([0.0, -50.0, -50.0, -50.0, -50.0, 0.0])  # group 0 -> particle 0, group 1 -> particle 5
    idx = resample_indices(log_w, 3, g)
    assert idx.tolist() == [0, 0, 0, 5, 5, 5]


@pytest.mark.parametrize("kwargs", [{"particles": 0}, {"potential": "min"}, {"lam": 0.0}, {"resample_every": 0},
                                    {"select": "best"}])
def test_fk_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        FKSteeringConfig(**kwargs).validate()


def test_best_of_n_gains_reward_and_counts_n_queries_per_sample(train_on_gaussian):
    _, final = train_on_gaussian("best_of_n", steps=1, **{"method.n": 4})
    assert final["reward_queries"] == 0 and final["iterations"] == 0
    assert final["queries_per_sample"] == 4
    assert final["path_kl"] == pytest.approx(best_of_n_kl(4), abs=1e-6)
    # the base has E[r] = 0 and r ~ N(0, 1.25): the best of 4 has E[r] = 1.029 * sqrt(1.25) = 1.15 (less with
    # the 10-step sampler's own error)
    assert final["reward_mean"] > 0.6


def test_fk_steering_gains_reward_and_counts_every_intermediate_score(train_on_gaussian):
    _, final = train_on_gaussian("fk_steering", steps=1, **{"method.particles": 4, "method.resample_every": 3})
    # 10 steps: resamplings after steps 3, 6, 9 plus the final score -> 4 scores of 4 particles per sample
    assert final["queries_per_sample"] == 16
    assert final["path_kl"] is None and final["regret"] is None and final["x0_regret"] is not None
    assert final["reward_mean"] > 0.3  # the base has E[r] = 0
