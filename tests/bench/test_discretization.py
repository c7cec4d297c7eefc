"""Discretization robustness: with_steps rebuilds the sampler around the same networks, the evaluation rows of tiny
runs of score-as-action, DDPO and SQDF, `sqdf bench --discretization` files, the tables and bad values."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from sqdf.bench import discretization as disc
from sqdf.bench import discretization_study as dbench
from sqdf.cli import main
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("score-as-action", "ddpo", "sqdf")
STEPS = (5, 10)
N = 128
TINY = ["--queries", "128", "--seeds", "1", "--jobs", "1", "--eval-samples", "64", "--set",
        "task.num_inference_steps=10", "--set", "method.batch_size=16"]


# ---- settings and with_steps -----------------------------------------------------------------------------------
def test_parse_steps():
    assert disc.parse_steps("100, 10,20,10") == (10, 20, 100)
    assert disc.parse_steps([50, "5"]) == (5, 50)
    with pytest.raises(ConfigError, match="'abc' is not a whole number"):
        disc.parse_steps("10,abc")
    with pytest.raises(ConfigError, match="0 steps is not allowed"):
        disc.parse_steps("0,10")
    with pytest.raises(ConfigError, match="names no step count"):
        disc.parse_steps(" , ")


def _net(seed: int) -> nn.Module:
    from sqdf.models.denoisers import MLPDenoiser

    torch.manual_seed(seed)
    return MLPDenoiser(2, hidden=16, num_layers=2, num_train_steps=200)


def test_with_steps_equals_a_fresh_policy_and_shares_the_networks():
    config = ScheduleConfig(num_train_steps=200)
    policy = DiffusionPolicy(_net(0), NoiseSchedule(config, 8, eta=0.5, clip_sample=3.0), (2,), reference=_net(1))
    short = disc.with_steps(policy, 5)
    assert short.model is policy.model and short.reference is policy.reference  # nothing copied
    assert (short.num_steps, short.schedule.eta, short.schedule.clip_sample) == (5, 0.5, 3.0)
    fresh = DiffusionPolicy(policy.model, NoiseSchedule(config, 5, eta=0.5, clip_sample=3.0), (2,),
                            reference=policy.reference)
    a = short.sample(64, generator=torch.Generator().manual_seed(3))
    b = fresh.sample(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.states, b.states, rtol=0, atol=0)
    torch.testing.assert_close(a.kls, b.kls, rtol=0, atol=0)
    assert a.path_kl.min() > 0  # policy and reference differ


class _AdapterNet(nn.Module):
    """A stand-in for a peft model: disable_adapter() switches its 'adapter' (a shift of the output) off."""

    def __init__(self):
        super().__init__()
        self.net, self.on = _net(0), True
        self.shift = nn.Parameter(torch.full((2,), 0.3))

    @contextmanager
    def disable_adapter(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def forward(self, x, t, cond=None):
        return self.net(x, t, cond) + (self.shift if self.on else 0.0)


def test_with_steps_keeps_the_adapter_reference_without_a_copy():
    policy = DiffusionPolicy(_AdapterNet(), NoiseSchedule(ScheduleConfig(num_train_steps=200), 8), (2,))
    short = disc.with_steps(policy, 4)
    assert short.reference is None and short._adapter_reference and short.model is policy.model
    x = torch.randn(4, 2)
    eps, _ = short.predict(x, 1, which="reference")
    with policy.model.disable_adapter():
        expected = policy.model.net(x, torch.full((4,), short.schedule.timesteps[1]))
    torch.testing.assert_close(eps, expected)


# ---- tiny runs through `sqdf bench --discretization` -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("disc") / "b"
    code = main(["bench", "gaussian", "--methods", ",".join(METHODS), "--out", str(out), *TINY,
                 "--discretization", ",".join(map(str, STEPS)), "--discretization-samples", str(N)])
    return code, out


def test_bench_flag_writes_the_files(tiny_bench):
    code, out = tiny_bench
    assert code == 0
    text = (out / "discretization.md").read_text()
    assert "--discretization 5,10 --discretization-samples 128" in text
    assert "### gaussian (J* = 0.6250; seeds 0; trained with score-as-action: EM 10, ddpo: DDPM 10, sqdf: DDPM 10)" \
        in text
    for method in (*METHODS, disc.FLOOR):
        assert f"| {method} | Heun |" in text
    assert "| 5 steps | 10 steps |" in text and " †" in text
    assert (out / "plots" / "discretization_gaussian.png").stat().st_size > 1000
    for method in METHODS:
        assert (out / "runs" / "gaussian" / method / "seed0" / dbench.CACHE_NAME).exists()


def test_evaluation_rows_have_the_keys_and_finite_values(tiny_bench):
    _, out = tiny_bench
    data = json.loads((out / "discretization.json").read_text())
    assert (data["steps"], data["samplers"], data["samples"], data["failed"]) == (list(STEPS), list(disc.SAMPLERS), N,
                                                                                  [])
    rows = data["rows"]
    assert len(rows) == (len(METHODS) + 1) * len(disc.SAMPLERS) * len(STEPS)
    for row in rows:
        for key in ("reward_mean", "reward_stderr", "x0_kl", "x0_regret", "mode_tv", "energy_distance", "seconds"):
            assert math.isfinite(row[key]), (row["method"], row["sampler"], row["steps"], key)
        if row["sampler"] == "ode":  # deterministic: no path KL, no path regret
            assert row["path_kl"] is None and row["regret"] is None and row["kl_kind"] is None
        else:
            assert all(math.isfinite(row[k]) for k in ("path_kl", "regret", "regret_stderr", "objective"))
            assert row["regret"] == pytest.approx(row["optimum"] - row["objective"])
            assert row["kl_kind"].startswith("estimate" if row["sampler"] == "heun" else "exact")
        assert row["x0_regret"] == pytest.approx(0.625 - (row["reward_mean"] - row["x0_kl"]), abs=1e-6)
    trained = {(r["method"], r["sampler"], r["steps"]) for r in rows if r["trained"]}
    assert trained == {("score-as-action", "em", 10), ("ddpo", "ddpm", 10), ("sqdf", "ddpm", 10)}
    assert {r["train_steps"] for r in rows if r["method"] != disc.FLOOR} == {10}


def test_the_ddpm_setting_at_the_training_steps_is_the_runs_own_sampler(tiny_bench):
    from sqdf.training.saved_runs import load_run

    _, out = tiny_bench
    run = load_run(str(out / "runs" / "gaussian" / "ddpo" / "seed0"))
    traj = run.policy.sample(N, None, torch.Generator().manual_seed(disc.DEFAULT_SEED))
    row = next(r for r in disc.evaluate_run(run, (10,), ("ddpm",), N) if r["trained"])
    assert row["reward_mean"] == pytest.approx(float(run.task.reward(traj.samples).double().mean()), abs=1e-6)
    assert row["path_kl"] == pytest.approx(float(traj.path_kl.mean()), rel=1e-5)


def test_rerun_reuses_the_cached_evaluations(tiny_bench, capsys):
    _, out = tiny_bench
    cache = out / "runs" / "gaussian" / "sqdf" / "seed0" / dbench.CACHE_NAME
    before = cache.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["bench", "gaussian", "--methods", ",".join(METHODS), "--out", str(out), *TINY,
                 "--discretization", "10,5", "--discretization-samples", str(N)]) == 0
    assert "4 cached" in capsys.readouterr().out
    assert cache.stat().st_mtime_ns == before


def test_bad_discretization_values_fail_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY,
                 "--discretization", "0,abc"]) == 2
    err = capsys.readouterr().err
    assert "--discretization '0,abc'" in err and "10,20,50,100" in err
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY,
                 "--discretization", "10,1000"]) == 2
    assert "1000 steps" in capsys.readouterr().err
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY,
                 "--discretization-samples", "64"]) == 2
    assert "add e.g. --discretization 10,20,50,100" in capsys.readouterr().err
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), "--blackbox", "64",
                 "--discretization", "10"]) == 2
    assert "drop it or --blackbox" in capsys.readouterr().err
    assert not out.exists()


def test_an_inference_method_has_no_training_setting():
    from sqdf.methods import BestOfN, BestOfNConfig

    policy = DiffusionPolicy(_net(0), NoiseSchedule(ScheduleConfig(num_train_steps=200), 4), (2,))
    method = BestOfN(BestOfNConfig(), policy, 1.0)
    assert disc.training_setting(method) is None
    assert not dbench.rediscretizable("best_of_n") and not dbench.rediscretizable("rlcm")
    assert dbench.rediscretizable("score-as-action") and dbench.rediscretizable("ddpo")

    class Run:
        pass

    run = Run()
    run.method, run.policy, run.task = method, policy, None
    with pytest.raises(ConfigError, match="best_of_n has no fine-tuned"):
        disc.evaluate_run(run, (4,))


# ---- tables (pure) ---------------------------------------------------------------------------------------------
def _row(method, seed, sampler, steps, x0, trained=False, regret=None, reward=0.5):
    return {"task": "t", "method": method, "seed": seed, "sampler": sampler, "steps": steps, "trained": trained,
            "optimum": 1.0, "x0_regret": x0, "regret": regret, "reward_mean": reward, "mode_tv": 0.0,
            "train_sampler": None if method == disc.FLOOR else "ddpm", "train_steps": 20}


def test_task_tables_marks_the_training_setting_and_per_seed_changes():
    rows = [_row("a", 0, "ddpm", 20, 0.2, True, 0.3), _row("a", 1, "ddpm", 20, 0.4, True, 0.5),
            _row("a", 0, "ddpm", 50, 0.5, regret=0.6), _row("a", 1, "ddpm", 50, 0.5, regret=0.7),
            _row("a", 0, "ode", 50, 0.1), _row(disc.FLOOR, 0, "ddpm", 20, 0.05, regret=0.07)]
    text = dbench.task_tables("t", rows, ["a"], (20, 50), ("ddpm", "ode"))
    assert "### t (J* = 1.0000; seeds 0, 1; trained with a: DDPM 20)" in text
    assert "| a | DDPM | 0.400 ± 0.141 (0.500) † | 0.650 ± 0.071 (0.500) |" in text  # regret (reward)
    assert f"| {disc.FLOOR} | DDPM | 0.070 (0.500) | — |" in text
    assert "| a | ODE (Heun) | — | 0.100 |" in text  # x0 regret only
    assert "| a | DDPM | 0 † | +0.200 ± 0.141 |" in text  # per seed: 0.5 - 0.2, 0.5 - 0.4
    assert "| a | ODE (Heun) | — | -0.100 |" in text  # seed 0 only: 0.1 - 0.2
    assert "Mode TV" not in text  # no mode has any weight error: the table is left out
