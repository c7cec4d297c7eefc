"""`sqdf bench`: the pure aggregation on hand-made rows, and one tiny end-to-end bench (re-run, failures, bad names)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sqdf.methods
import sqdf.tasks
from sqdf.bench import runs, tables
from sqdf.cli import main
from sqdf.diffusion.mixture import GaussianMixture
from sqdf.errors import ConfigError
from sqdf.tasks import MixtureTask, TaskConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(method, seed, **values):
    base = {"task": "t", "method": method, "seed": seed, "optimum": 1.5, "floor": {"regret": 0.01}}
    return {**base, **values}


# ---- aggregation (pure) ----------------------------------------------------------------------------------------


def test_split_names_accepts_spaces_and_commas():
    assert tables.split_names(["gmm1,gmm2", "gaussian", " gmm1 , mix25to9"]) == ["gmm1", "gmm2", "gaussian", "mix25to9"]
    assert tables.split_names(None) == [] and tables.split_names([""]) == []


def test_summarize_mean_and_sample_sd():
    stat = tables.summarize([1.0, 2.0, None, 4.0])
    assert stat.n == 3
    assert stat.mean == pytest.approx(7 / 3)
    assert stat.sd == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std(unbiased=True).item())  # ddof=1
    assert tables.summarize([3.0]) == tables.Stat(3.0, None, 1)
    assert tables.summarize([None, None]) is None


def test_format_stat():
    assert tables.format_stat(tables.Stat(1.23456, 0.1, 2), ".3f") == "1.235 ± 0.100"
    assert tables.format_stat(tables.Stat(1.23456, None, 1), ".3f") == "1.235"  # one seed: no ±
    assert tables.format_stat(None, ".3f") == "—"


def test_best_indices():
    assert tables.best_indices([1.0, 3.0, None, 3.0], "max") == {1, 3}  # ties all win
    assert tables.best_indices([1.0, float("nan"), 0.5], "min") == {2}  # NaN never wins
    assert tables.best_indices([1.0, 2.0], None) == set()
    assert tables.best_indices([1.0, None], "max") == set()  # nothing to compare against


def _cells(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {method}"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_task_table_means_bold_and_missing_values():
    rows = [
        _row("a", 0, reward_mean=1.0, path_kl=0.5, regret=0.2, x0_regret=0.3, mode_tv=0.1, energy_distance=0.05,
             reward_queries=100, queries_per_sample=0.0, wall_seconds=10.0),
        _row("a", 1, reward_mean=2.0, path_kl=0.7, regret=0.4, x0_regret=0.5, mode_tv=0.3, energy_distance=0.07,
             reward_queries=100, queries_per_sample=0.0, wall_seconds=12.0),
        # an inference-time method with no path KL (so no regret) but a better x0 regret
        _row("b", 0, reward_mean=1.2, path_kl=None, regret=None, x0_regret=0.1, mode_tv=0.4, energy_distance=0.09,
             reward_queries=0, queries_per_sample=8.0, wall_seconds=1.0),
        _row("b", 1, reward_mean=1.4, path_kl=None, regret=None, x0_regret=0.2, mode_tv=0.4, energy_distance=0.11,
             reward_queries=0, queries_per_sample=8.0, wall_seconds=1.0),
    ]
    text = tables.task_table("t", tables.group_rows(rows)["t"])
    assert text.splitlines()[0] == "### t (J* = 1.5000, exact-score floor regret 0.0100)"
    headers = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    shown = [c for c in tables.COLUMNS if c.key not in ("target_accuracy", "frechet", "diversity", "spread_ratio")]
    assert headers == ["method"] + [c.header for c in shown]  # columns no run reports are left out
    a, b = _cells(text, "a"), _cells(text, "b")
    col = {c.key: j for j, c in enumerate(shown)}
    assert a[col["reward_mean"]] == "**1.5000 ± 0.7071**"  # max reward wins
    assert b[col["reward_mean"]] == "1.3000 ± 0.1414"
    assert a[col["regret"]] == "0.3000 ± 0.1414"  # the only regret: nothing to beat, no bold
    assert b[col["regret"]] == "—" and b[col["path_kl"]] == "—"
    assert b[col["x0_regret"]] == "**0.1500 ± 0.0707**"  # min x0 regret wins
    assert a[col["mode_tv"]] == "**0.200 ± 0.141**" and b[col["mode_tv"]] == "0.400 ± 0.000"
    assert a[col["energy_distance"]] == "**0.0600 ± 0.0141**"
    assert a[col["path_kl"]] == "0.6000 ± 0.1414"  # KL, queries, seconds: never bold
    assert a[col["reward_queries"]] == "100 ± 0" and b[col["queries_per_sample"]] == "8.0 ± 0.0"
    assert a[col["wall_seconds"]] == "11.0 ± 1.4"


def test_task_table_one_seed_and_failed_runs():
    rows = [_row("a", 0, reward_mean=1.0, regret=0.25), _row("b", 0, reward_mean=0.5, regret=0.5, mode_tv=0.2),
            {"task": "t", "method": "b", "seed": 1, "error": "RuntimeError: boom"}]
    text = tables.results_tables(rows, methods=["b", "a"])
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels == ["method", "b (1 of 2 runs failed)", "a"]  # the given method order
    headers = [c.strip() for c in text.splitlines()[2].strip("|").split("|")][1:]
    col = [next(c.key for c in tables.COLUMNS if c.header == h) for h in headers]
    assert "energy_distance" not in col  # no run reports it: left out
    assert _cells(text, "a")[col.index("reward_mean")] == "**1.0000**"  # one seed: no ±
    assert _cells(text, "b (1")[col.index("regret")] == "0.5000"
    assert _cells(text, "a")[col.index("mode_tv")] == "—"  # a key this method's rows lack


def test_curves_and_kl_choice():
    curves = [[{"reward_queries": 0, "regret": 1.0}, {"reward_queries": 10, "regret": 0.5}],
              [{"reward_queries": 0, "regret": 3.0}, {"reward_queries": 10, "regret": None}]]
    assert tables.mean_curve(curves, "regret") == ([0, 10], [2.0, 0.5])
    assert tables.kl_values([{"path_kl": 1.0, "x0_kl": 2.0}]) == ([1.0], "path_kl")
    assert tables.kl_values([{"path_kl": None, "x0_kl": 2.0}, {"path_kl": 1.0, "x0_kl": 3.0}]) == ([2.0, 3.0], "x0_kl")
    assert runs.config_differences({"trainer": {"seed": 0, "x": 1}}, {"trainer": {"seed": 0, "x": 2}}) \
        == ["trainer.x: 1 -> 2"]


def test_override_applies_to_methods_that_have_the_key(monkeypatch):
    class NoTraining(sqdf.methods.InferenceMethod):
        name = "no_training"

    monkeypatch.setitem(sqdf.methods.METHODS, "no_training", NoTraining)
    scope = runs.override_scope(["sqdf", "no_training"], ["method.gamma=0.9", "method.batch_size=8"])
    assert scope == {"method.gamma=0.9": ["sqdf"], "method.batch_size=8": ["sqdf", "no_training"]}
    assert runs.bench_config("no_training", "gaussian", 0, 64, 32, ["method.gamma=0.9"]).method.batch_size == 64
    with pytest.raises(ConfigError, match="did you mean method.gamma"):
        runs.override_scope(["sqdf", "no_training"], ["method.gamm=0.9"])


def test_bench_config_sets_the_budget():
    config = runs.bench_config("sqdf-paper", "gmm1", 3, 1000, 256, ["trainer.device=auto"])
    t = config.trainer
    assert (t.seed, t.max_queries, t.steps, t.eval_every, t.eval_every_queries, t.eval_samples) == \
        (3, 1000, runs.STEP_CAP, 0, 250, 256)
    assert (t.tensorboard, t.progress, t.device) == (False, False, "auto")
    assert config.method.gamma == sqdf.tasks.PRESETS["gmm1"]["sqdf-paper"]["method"]["gamma"]  # presets applied
    assert config.method.lr == sqdf.tasks.BENCH_PRESETS["gmm1"]["sqdf-paper"]["method"]["lr"]  # bench presets too


# ---- end to end ------------------------------------------------------------------------------------------------

TINY = ["--queries", "256", "--seeds", "1", "--jobs", "1", "--eval-samples", "128",
        "--set", "task.num_inference_steps=10", "--set", "method.batch_size=16"]


@pytest.fixture(scope="module")
def finished_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b"
    code = main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY])
    return code, out


def test_bench_writes_results_table_and_plots(finished_bench):
    code, out = finished_bench
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 1
    row = rows[0]
    assert (row["task"], row["method"], row["seed"]) == ("gaussian", "sqdf", 0)
    assert row["run_dir"] == os.path.join(str(out), "runs", "gaussian", "sqdf", "seed0")
    summary = json.loads((out / "runs" / "gaussian" / "sqdf" / "seed0" / "summary.json").read_text())
    assert {k: row[k] for k in summary} == summary
    assert 256 <= row["reward_queries"] < 256 + 64  # the budget ends the run
    curve = row["curve"]
    assert curve[0]["reward_queries"] == 0 and curve[-1]["reward_queries"] == row["reward_queries"]
    assert len(curve) >= 5  # base + one per quarter of the budget
    assert set(curve[0]) == set(tables.CURVE_KEYS)
    table = (out / "table.md").read_text()
    assert "sqdf bench gaussian --methods sqdf --queries 256 --seeds 1" in table
    assert "### gaussian (J* = 0.6250, exact-score floor regret" in table
    assert f"| sqdf | {row['reward_mean']:.4f} |" in table
    for name in ("regret_vs_queries_gaussian.png", "tradeoff.png", "samples_gaussian.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_rerun_reuses_the_finished_run(finished_bench, capsys):
    code, out = finished_bench
    assert code == 0
    summary = out / "runs" / "gaussian" / "sqdf" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "reusing 1 finished, running 0" in printed
    assert "| sqdf |" in printed and str(out / "table.md") in printed
    assert summary.stat().st_mtime_ns == before


def test_unknown_method_exits_2_naming_it(tmp_path, capsys):
    code = main(["bench", "gaussian", "--methods", "sqdf,sqd", "--out", str(tmp_path / "b"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'sqd'" in err and "did you mean 'sqdf'" in err
    assert not (tmp_path / "b").exists()


def test_unknown_task_and_key_exit_2(tmp_path, capsys):
    assert main(["bench", "gmm9", "--methods", "sqdf", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "unknown task 'gmm9'" in capsys.readouterr().err
    assert main(["bench", "gaussian", "--methods", "sqdf", "--out", str(tmp_path / "b"), *TINY,
                 "--set", "method.gamm=1"]) == 2
    assert "did you mean method.gamma" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _broken_task(config: TaskConfig) -> MixtureTask:
    def reward(x, cond=None):
        raise KeyError("no such feature")

    base = GaussianMixture(torch.zeros(1, 2), torch.eye(2)[None], torch.ones(1))
    return MixtureTask(base, reward, 1.0, config, name="broken", description="its reward raises")


def test_a_failed_run_is_recorded_and_gives_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sqdf.tasks.TASKS, "broken", _broken_task)
    out = tmp_path / "b"
    code = main(["bench", "broken", "--methods", "sqdf", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken/sqdf/seed0" in err and "no such feature" in err
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["method"] == "sqdf" and "no such feature" in rows[0]["error"]
    assert "sqdf (1 of 1 runs failed)" in (out / "table.md").read_text()
    assert "KeyError" in (out / "runs" / "broken" / "sqdf" / "seed0" / "error.txt").read_text()


def test_process_pool_runs_every_seed(tmp_path):
    out = tmp_path / "b"
    argv = ["bench", "gaussian", "--methods", "sqdf", "--out", str(out), *TINY]
    argv[argv.index("--seeds") + 1], argv[argv.index("--jobs") + 1] = "2", "2"
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1]  # the order of the plan, whichever finished first
    assert rows[0]["reward_mean"] != rows[1]["reward_mean"]
    assert "| sqdf | " in (out / "table.md").read_text() and " ± " in (out / "table.md").read_text()


def test_overview_table_means_and_bold():
    from sqdf.bench.tables import overview_table

    rows = [{"task": "a", "method": "m1", "regret": 1.0, "x0_regret": 0.5},
            {"task": "a", "method": "m1", "regret": 2.0, "x0_regret": 0.7},
            {"task": "a", "method": "m2", "regret": None, "x0_regret": 0.2},
            {"task": "b", "method": "m2", "regret": 0.3, "x0_regret": 0.1},
            {"task": "b", "method": "m1", "regret": 0.4, "x0_regret": 0.1},
            {"task": "b", "method": "m1", "error": "boom"}]
    lines = overview_table(rows).splitlines()
    assert lines[2] == "| method | a | b |"
    assert lines[4] == "| m1 | 1.500 (0.600) | 0.400 (0.100) |"
    assert lines[5] == "| m2 | — (0.200) | **0.300 (0.100)** |"


def test_alpha_variants_are_tasks_of_their_own(tmp_path):
    assert runs.task_variant("gmm1") == ("gmm1", None) and runs.task_variant("gmm1@0.3") == ("gmm1", 0.3)
    assert runs.with_alphas(["gmm1", "gaussian"], "0.1,3") == ["gmm1@0.1", "gmm1@3", "gaussian@0.1", "gaussian@3"]
    with pytest.raises(ConfigError, match="'gmm1@0': .*positive number"):
        runs.task_variant("gmm1@0")
    out = tmp_path / "b"
    assert main(["bench", "gaussian", "--alphas", "0.5,2", "--methods", "sqdf-paper", "--out", str(out), *TINY]) == 0
    rows = {r["task"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"gaussian@0.5", "gaussian@2"}
    # the optimum of the linear reward w.x on N(0, I) is |w|^2 / (2 alpha): 1.25 / (2 alpha)
    assert rows["gaussian@0.5"]["optimum"] == pytest.approx(1.25) and rows["gaussian@2"]["optimum"] == pytest.approx(0.3125)
    assert rows["gaussian@2"]["alpha"] == 2.0 and "spread_ratio" in rows["gaussian@2"]
    table = (out / "table.md").read_text()
    assert "### gaussian@0.5" in table and "### gaussian@2" in table


def test_alpha_variant_of_a_task_with_one_known_alpha_exits_2(tmp_path, capsys):
    assert main(["bench", "mix25to9@0.3", "--methods", "sqdf", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "task.alpha=0.3" in capsys.readouterr().err
