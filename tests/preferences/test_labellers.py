"""Online labellers: Bradley-Terry on a reward, localhost HTTP, a file of answers; the budgeted durable log."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.preferences.labellers import (
    AnswerFileLabeller,
    HTTPLabeller,
    LabelBudgetExceeded,
    LabelLog,
    LabelsPending,
    RewardLabeller,
    make_labeller,
    pair_ids,
)


def _reward(x, cond=None):
    return x[:, 0]


def test_pair_ids_depend_on_order_content_and_condition():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    ids = pair_ids(a, b)
    assert len(set(ids)) == 3 and ids == pair_ids(a.clone(), b.clone())
    assert pair_ids(b, a) != ids
    assert pair_ids(a, b, torch.tensor([0, 1, 2])) != pair_ids(a, b, torch.tensor([1, 1, 2]))
    with pytest.raises(ConfigError, match="same shape"):
        pair_ids(a, torch.randn(3, 3))


def test_reward_labeller_matches_the_bradley_terry_probability_and_is_reproducible():
    n = 20_000
    a = torch.stack([torch.full((n,), 1.0), torch.randn(n)], 1)  # r(a) - r(b) = 1 for every pair
    b = torch.stack([torch.zeros(n), torch.randn(n)], 1)
    lab = RewardLabeller(_reward, temperature=1.0, seed=3)
    y = lab(a, b)
    assert abs(float(y.mean()) - 1 / (1 + math.exp(-1))) < 0.015
    hotter = RewardLabeller(_reward, temperature=2.0, seed=3)(a, b)  # P(a wins) = sigmoid(1 / 2)
    assert abs(float(hotter.mean()) - 1 / (1 + math.exp(-0.5))) < 0.015
    torch.testing.assert_close(RewardLabeller(_reward, 1.0, seed=3)(a[:50], b[:50]), y[:50])  # per pair, any order
    det = RewardLabeller(_reward, temperature=0.0)(torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[0.0], [1.0],
                                                                                                       [2.0]]))
    assert det.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="temperature"):
        RewardLabeller(_reward, temperature=-1.0)


def test_label_log_charges_each_pair_once_and_survives_a_restart(tmp_path):
    calls = []

    def labeller(a, b, cond):
        calls.append(a.shape[0])
        return (a[:, 0] > b[:, 0]).float()

    a, b = torch.randn(6, 2), torch.randn(6, 2)
    log = LabelLog(labeller, budget=8, log_dir=str(tmp_path))
    y = log(a[:4], b[:4])
    assert log.spent == 4 and calls == [4]
    y2 = log(a, b)  # four known, two new
    assert calls == [4, 2] and log.spent == 6
    torch.testing.assert_close(y2[:4], y)
    reopened = LabelLog(labeller, budget=8, log_dir=str(tmp_path))
    assert reopened.spent == 6
    torch.testing.assert_close(reopened(a, b), y2)
    assert calls == [4, 2]  # answered from the log
    assert reopened.logged()["labels"].shape == (6,)
    with pytest.raises(LabelBudgetExceeded, match="label_budget"):
        reopened(torch.randn(3, 2), torch.randn(3, 2))
    lines = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert sum(len(json.loads(line)["ids"]) for line in lines) == 6


def test_label_log_rejects_bad_answers_without_charging():
    log = LabelLog(lambda a, b, c: torch.tensor([1.0, 0.3]))
    with pytest.raises(ConfigError, match="0.3"):
        log(torch.randn(2, 1), torch.randn(2, 1))
    log = LabelLog(lambda a, b, c: [1.0])
    with pytest.raises(ConfigError, match="1 labels for 2 pairs"):
        log(torch.randn(2, 1), torch.randn(2, 1))
    assert log.spent == 0


def test_answer_file_asks_then_reads_the_answers(tmp_path):
    answers = tmp_path / "answers.jsonl"
    lab = AnswerFileLabeller(str(answers), str(tmp_path / "questions"))
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(LabelsPending, match="3 pairs need labels"):
        lab(a, b)
    questions = [json.loads(line) for line in (tmp_path / "questions" / "questions.jsonl").read_text().splitlines()]
    assert [q["pair"] for q in questions] == pair_ids(a, b)
    answers.write_text("".join(json.dumps({"pair": q["pair"], "label": [1, 0, 0.5][i]}) + "\n"
                               for i, q in enumerate(questions)))
    assert lab(a, b).tolist() == [1.0, 0.0, 0.5]
    answers.write_text('{"pair": "x", "label": 2}\n')
    with pytest.raises(ConfigError, match="line 1: label 2.0"):
        lab(a, b)


def test_http_labeller_round_trip_and_refuses_remote_hosts(json_server):
    url = json_server(lambda body: {"labels": [1.0 if x[0] > y[0] else 0.0 for x, y in zip(body["a"], body["b"])]})
    lab = make_labeller(url + "label", None)
    assert isinstance(lab, HTTPLabeller)
    a, b = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    assert lab(a, b).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="localhost"):
        HTTPLabeller("http://example.com/label")
    with pytest.raises(ConfigError, match="answers:PATH"):
        make_labeller("bogus", None)
