"""The black-box oracle: hard budget, noise, a durable log, no re-query after a restart, parallel and HTTP modes."""

from __future__ import annotations

import json

import pytest
import torch

from sqdf.blackbox import BudgetExceeded, Oracle, http_reward, sample_ids
from sqdf.errors import ConfigError, RewardError


class Counting:
    """r(x) = -||x||^2 that counts the samples it was asked about."""

    def __init__(self):
        self.asked = 0

    def __call__(self, x, cond=None):
        self.asked += x.shape[0]
        return -(x.flatten(1) ** 2).sum(1)


def test_budget_is_never_exceeded_and_a_refused_query_costs_nothing():
    fn = Counting()
    oracle = Oracle(fn, budget=10)
    x = torch.randn(6, 2)
    torch.testing.assert_close(oracle(x), -(x**2).sum(1))
    with pytest.raises(BudgetExceeded, match="needs 6 new labels but only 4 of the budget of 10"):
        oracle(torch.randn(6, 2))
    assert oracle.spent == 6 and fn.asked == 6
    oracle(x)  # already paid for: free
    assert oracle.spent == 6 and fn.asked == 6
    oracle(torch.randn(4, 2))
    assert oracle.spent == oracle.budget == 10 and fn.asked == 10
    with pytest.raises(BudgetExceeded):
        oracle(torch.randn(1, 2))


def test_duplicates_in_one_query_are_charged_once():
    fn = Counting()
    oracle = Oracle(fn, budget=3)
    x = torch.randn(2, 2)
    out = oracle(torch.cat([x, x, x[:1]]))
    assert fn.asked == 2 and oracle.spent == 2
    assert out[0] == out[2] == out[4] and out[1] == out[3]


def test_noise_has_the_requested_std_and_is_kept():
    oracle = Oracle(lambda x, c=None: torch.zeros(x.shape[0]), budget=20000, noise_std=0.1, seed=3)
    x = torch.randn(20000, 1, dtype=torch.float64)
    values = oracle(x)
    assert abs(float(values.std()) - 0.1) < 0.003 and abs(float(values.mean())) < 0.003
    torch.testing.assert_close(oracle(x[:5]), values[:5])  # the same noisy label, not a fresh draw


def test_restart_answers_paid_queries_from_the_log(tmp_path):
    fn = Counting()
    x, cond = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    first = Oracle(fn, budget=8, noise_std=0.5, log_dir=str(tmp_path / "log"))
    values = first(x, cond)
    del first  # a crash: only the log survives
    again = Oracle(Counting(), budget=8, noise_std=0.5, log_dir=str(tmp_path / "log"))
    assert again.spent == 5 and again.remaining == 3
    torch.testing.assert_close(again(x, cond), values)  # no re-query, same labels
    assert again.fn.asked == 0
    other_cond = cond.clone()
    other_cond[0] = 9  # the same image under another condition is a new query
    again(x[:1], other_cond[:1])
    assert again.fn.asked == 1
    logged = again.logged()
    assert logged["x"].shape == (6, 3) and logged["values"].shape == (6,)
    lines = [json.loads(line) for line in open(tmp_path / "log" / "queries.jsonl")]
    assert sum(len(row["ids"]) for row in lines) == 6
    with pytest.raises(ConfigError, match="more than the budget"):
        Oracle(Counting(), budget=4, log_dir=str(tmp_path / "log"))


def test_failures_charge_nothing_and_say_why():
    oracle = Oracle(lambda x, c=None: torch.full((x.shape[0],), float("nan")), budget=5)
    with pytest.raises(RewardError, match="NaN"):
        oracle(torch.randn(2, 2))
    assert oracle.spent == 0
    with pytest.raises(RewardError, match=r"returned \(3,\) values for 2 samples"):
        Oracle(lambda x, c=None: torch.zeros(3), budget=5)(torch.randn(2, 2))
    with pytest.raises(ConfigError, match="budget=0"):
        Oracle(Counting(), budget=0)


def test_parallel_workers_give_the_same_answers():
    x = torch.randn(13, 2)
    calls = []

    def slow(xs, c=None):
        calls.append(xs.shape[0])
        return -(xs**2).sum(1)

    torch.testing.assert_close(Oracle(slow, budget=13, workers=4)(x), -(x**2).sum(1))
    assert sorted(calls) == [1, 4, 4, 4]


def test_http_oracle_on_localhost(json_server):
    url = json_server(lambda body: {"values": [sum(v * v for v in row) + (c or 0)
                                               for row, c in zip(body["x"], body["cond"])]})
    oracle = Oracle(http_reward(url + "score"), budget=4)
    x, cond = torch.tensor([[1.0, 2.0], [0.0, 3.0]]), torch.tensor([1, 0])
    torch.testing.assert_close(oracle(x, cond), torch.tensor([6.0, 9.0]))
    with pytest.raises(ConfigError, match="localhost"):
        http_reward("http://example.com/score")


def test_ids_follow_contents():
    x = torch.randn(3, 2)
    assert sample_ids(x) == sample_ids(x.clone()) and len(set(sample_ids(x))) == 3
    assert sample_ids(x, torch.tensor([0, 0, 0])) != sample_ids(x, torch.tensor([1, 0, 0]))
