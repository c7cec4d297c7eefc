"""The black-box round loop: the budget is never exceeded, rounds improve the true reward on a toy task, and a
run killed mid-round resumes to the same result without buying any label twice."""

from __future__ import annotations

import json

import pytest

from sqdf.blackbox.loop import BlackboxRun
from sqdf.blackbox.run_folder import BlackboxConfig
from sqdf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, budget=48, shares="1,2", inner=3, **settings):
    from sqdf.training.run_setup import default_config

    cfg = default_config("sqdf", "gaussian")
    cfg.update({"trainer": {"device": "cpu", "progress": False, "tensorboard": False, "plots": False,
                            "eval_samples": 32, "checkpoint_every": 10**9, "floor": False},
                "task": {"num_inference_steps": 10}, "method": {"batch_size": 16, "lr": 3e-3, "gamma": 1.0}})
    for key, value in settings.items():
        cfg.set(key, value, raw=False)
    bb = BlackboxConfig(budget=budget, round_shares=shares, inner_steps=inner, eval_samples=256, noise_std=0.1)
    return BlackboxRun("gaussian", "sqdf", cfg, bb, str(out))


def test_rounds_spend_exactly_the_budget_and_learn(tmp_path):
    run = _run(tmp_path / "a", budget=96, shares="1,2,3", inner=8)
    rows = run.run()
    assert [r["queries"] for r in rows] == [0, 16, 48, 96]
    assert run.oracle.spent == 96 == run.bb.budget
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"] + 0.2  # linear reward w.x: moving along w pays
    assert rows[-1]["regret"] < rows[0]["regret"]
    assert all("proxy_rmse" in r for r in rows[1:])
    assert len(run.oracle.logged()["values"]) == 96


def test_budget_is_a_hard_limit():
    with pytest.raises(ConfigError, match="at least 2 labels"):
        BlackboxConfig(budget=10, round_shares="1,100").validate()
    assert sum(BlackboxConfig(budget=1000, round_shares="1,2,4,8").round_sizes()) == 1000
    assert BlackboxConfig(budget=1024 + 2048 + 4096 + 8192).round_sizes() == [1024, 2048, 4096, 8192]


def test_kill_mid_round_then_resume_buys_nothing_twice(tmp_path, monkeypatch, counted):
    straight = _run(tmp_path / "straight").run()
    bought_straight = counted["n"]
    assert bought_straight == 48

    counted["n"] = 0
    run = _run(tmp_path / "killed")
    from sqdf.training.trainer import Trainer

    real_train, seen = Trainer.train, {"n": 0}

    def dies_in_round_two(self):
        seen["n"] += 1
        if seen["n"] == 2:
            raise KeyboardInterrupt  # killed after round 2's labels were bought, before its fine-tuning ended
        return real_train(self)

    monkeypatch.setattr(Trainer, "train", dies_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    assert counted["n"] == 48  # both rounds' labels were paid for
    monkeypatch.setattr(Trainer, "train", real_train)
    resumed = BlackboxRun.resume(str(tmp_path / "killed"))
    assert resumed.round == 1 and resumed.oracle.spent == 48
    rows = resumed.run()
    assert counted["n"] == 48  # round 2's re-drawn samples were answered from the log
    key = lambda r: {k: v for k, v in r.items() if k != "proxy_rmse"}  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in straight]
    lines = (tmp_path / "killed" / "blackbox.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


def test_cli_blackbox_and_resume(tmp_path, capsys):
    from sqdf.cli import main

    out = tmp_path / "bb"
    args = ["blackbox", "gaussian", "--budget", "16", "--rounds", "1,1", "--inner-steps", "1", "--eval-samples", "16",
            "--out", str(out), "--set", "task.num_inference_steps=5", "--set", "method.batch_size=8",
            "--set", "trainer.device=cpu", "--set", "trainer.tensorboard=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "round  queries" in printed and "\n    2       16 " in printed
    assert (out / "blackbox.png").stat().st_size > 0  # the curves against queries
    assert main(args) == 2  # the folder already holds a run
    assert "--resume" in capsys.readouterr().err
    assert main(["blackbox", "--resume", str(out)]) == 0  # finished: nothing more to do or to buy
    assert len((out / "blackbox.jsonl").read_text().splitlines()) == 3
    assert main(["blackbox", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a `sqdf blackbox` run directory" in capsys.readouterr().err
