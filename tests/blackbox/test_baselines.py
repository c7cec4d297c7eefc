"""The rivals at the same oracle budget: a method trained on the oracle directly, and best-of-N selection by the
oracle's labels. Both spend exactly the budget, and a killed run resumes without buying a label twice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sqdf.blackbox.run_folder import BlackboxConfig
from sqdf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_direct_baseline_spends_exactly_the_budget_and_resumes(tmp_path, monkeypatch, counted):
    from sqdf.blackbox.baselines import DirectRun
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    def build(out):
        cfg = default_config("ddpo", "gaussian")
        cfg.update({"trainer": {"device": "cpu", "progress": False, "tensorboard": False, "plots": False,
                                "floor": False, "checkpoint_every": 1},
                    "task": {"num_inference_steps": 5}, "method": {"batch_size": 8, "lr": 1e-3}})
        return DirectRun("gaussian", "ddpo", cfg, BlackboxConfig(budget=32, eval_samples=64), str(out),
                         evaluations=4)

    rows = build(tmp_path / "a").run()
    assert counted["n"] == 32 and [r["queries"] for r in rows] == [0, 8, 16, 24, 32]
    with pytest.raises(ConfigError, match="multiple of method.batch_size"):
        DirectRun("gaussian", "ddpo", default_config("ddpo", "gaussian"), BlackboxConfig(budget=100), str(tmp_path))

    counted["n"] = 0
    real_step, seen = Trainer._optimizer_step, {"n": 0}

    def dies(self, loss):
        seen["n"] += 1
        if seen["n"] == 5:  # third iteration: its labels are bought, its update is not
            raise KeyboardInterrupt
        return real_step(self, loss)

    monkeypatch.setattr(Trainer, "_optimizer_step", dies)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "b").run()
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    assert counted["n"] == 24
    again = DirectRun.resume(str(tmp_path / "b")).run()
    assert counted["n"] == 32  # the interrupted iteration's batch came from the log
    assert [r["reward_mean"] for r in again] == [r["reward_mean"] for r in rows]


def _best_of(out, n=4, budget=96, shares="1,2"):
    from sqdf.blackbox.baselines import BestOfNRun
    from sqdf.training.run_setup import default_config

    cfg = default_config("best_of_n", "gaussian")
    cfg.update({"trainer": {"device": "cpu", "progress": False, "tensorboard": False, "plots": False, "floor": False},
                "task": {"num_inference_steps": 10}})
    return BestOfNRun("gaussian", cfg, BlackboxConfig(budget=budget, round_shares=shares, noise_std=0.1), str(out), n)


def test_best_of_n_picks_each_groups_best_label_and_spends_the_budget(tmp_path, counted):
    from sqdf.methods.best_of_n import best_of_n_kl

    run = _best_of(tmp_path / "a", n=4, budget=96, shares="1,2")
    rows = run.run()
    assert counted["n"] == 96 == run.oracle.spent  # 32 then 64 labels: 8 then 24 groups of 4
    assert [r["queries"] for r in rows] == [32, 96] and [r["outputs"] for r in rows] == [8, 24]
    assert all(r["path_kl"] == pytest.approx(math.log(4) - 3 / 4) for r in rows)
    assert rows[-1]["path_kl"] == pytest.approx(best_of_n_kl(4))

    # recompute the winners from the oracle log: the best noisy label of each consecutive group of 4
    data = run.oracle.logged()
    labels = data["values"].view(-1, 4)
    winners = data["x"].view(24, 4, -1)[torch.arange(24), labels.argmax(1)]
    true = run.task.reward(winners.to(torch.float64)).mean()
    assert rows[-1]["reward_mean"] == pytest.approx(float(true), rel=1e-5)
    # selection on a reward that grows along w beats the base (whose mean reward is 0)
    assert rows[-1]["reward_mean"] > 0.5
    assert rows[-1]["regret"] == pytest.approx(rows[-1]["optimum"] - rows[-1]["objective"])


def test_best_of_n_resume_buys_nothing_twice(tmp_path, monkeypatch, counted):
    from sqdf.blackbox.baselines import BestOfNRun
    from sqdf.blackbox.oracle import Oracle
    from sqdf.blackbox.resume import resume_run

    rows = _best_of(tmp_path / "a").run()
    counted["n"] = 0
    real_call, calls = Oracle.__call__, {"n": 0}

    def dies(self, x, cond=None):
        calls["n"] += 1
        out = real_call(self, x, cond)
        if calls["n"] == 2:  # killed right after the second round's labels were bought and logged
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Oracle, "__call__", dies)
    with pytest.raises(KeyboardInterrupt):
        _best_of(tmp_path / "b").run()
    monkeypatch.setattr(Oracle, "__call__", real_call)
    assert counted["n"] == 96
    again = resume_run(str(tmp_path / "b"))
    assert isinstance(again, BestOfNRun)
    assert again.run() == rows and counted["n"] == 96  # nothing bought again, same numbers
    saved = [json.loads(line) for line in (tmp_path / "b" / "blackbox.jsonl").read_text().splitlines()]
    assert saved == rows


def test_best_of_n_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be >= 2"):
        _best_of(tmp_path / "a", n=1)
    with pytest.raises(ConfigError, match="fewer than one group"):
        _best_of(tmp_path / "b", n=64, budget=96, shares="1,2")


def test_cli_best_of(tmp_path, capsys):
    from sqdf.cli import main

    out = tmp_path / "bon"
    assert main(["blackbox", "gaussian", "--budget", "64", "--best-of", "4", "--rounds", "1,1", "--out", str(out),
                 "--set", "task.num_inference_steps=5", "--set", "trainer.device=cpu"]) == 0
    text = capsys.readouterr().out
    assert "true reward" in text and (out / "blackbox.png").exists()
    assert main(["blackbox", "gaussian", "--best-of", "4", "--direct", "--out", str(tmp_path / "x")]) == 2
    assert "two different baselines" in capsys.readouterr().err
