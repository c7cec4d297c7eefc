"""`sqdf bench --blackbox`: entries parse with clear errors, every entry spends the same oracle budget, results and
plots are written, and a second call reuses the finished runs."""

from __future__ import annotations

import json

import pytest

from sqdf.bench.blackbox import Entry, parse_entry
from sqdf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_entry():
    assert parse_entry("sqdf") == Entry("sqdf", "proxy")
    assert parse_entry("ddpo:direct") == Entry("ddpo", "direct")
    assert parse_entry("best_of_n:16") == Entry("best_of_n", "best_of", 16)
    assert parse_entry("best_of_n").n == 8
    assert [parse_entry(t).label for t in ("sqdf", "prdp:direct", "best_of_n:4")] == \
        ["sqdf", "prdp:direct", "best_of_n:4"]
    with pytest.raises(ConfigError, match="':direct'"):
        parse_entry("ddpo:proxy")
    with pytest.raises(ConfigError, match="best_of_n:N"):
        parse_entry("fk_steering")
    with pytest.raises(ConfigError, match="integer N"):
        parse_entry("best_of_n:many")


def test_blackbox_bench_runs_every_entry_at_the_budget_and_reuses(tmp_path, capsys):
    from sqdf.cli import main

    out = tmp_path / "bb"
    argv = ["bench", "gaussian", "--blackbox", "32", "--methods", "sqdf,ddpo:direct,best_of_n:4", "--seeds", "1",
            "--rounds", "1,1", "--inner-steps", "2", "--eval-samples", "64", "--jobs", "1", "--out", str(out),
            "--set", "task.num_inference_steps=5", "--set", "method.batch_size=16"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| sqdf |" in text and "| ddpo:direct |" in text and "| best_of_n:4 |" in text
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["sqdf", "ddpo:direct", "best_of_n:4"]
    assert all(r["reward_queries"] == 32 and r["curve"][-1]["reward_queries"] == 32 for r in rows)
    assert [r["queries_per_sample"] for r in rows] == [0, 0, 4]
    assert (out / "plots" / "blackbox_gaussian.png").exists()
    assert (out / "runs" / "gaussian" / "ddpo-direct" / "seed0" / "oracle" / "queries.jsonl").exists()

    assert main(argv) == 0  # everything reused: same rows
    assert "reusing 3 finished" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert [r["regret"] for r in again] == [r["regret"] for r in rows]


def test_blackbox_bench_bad_entry_fails_before_running(tmp_path, capsys):
    from sqdf.cli import main

    assert main(["bench", "--blackbox", "32", "--methods", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_blackbox_presets_apply_below_the_command_line(tmp_path):
    from sqdf.bench.blackbox import BLACKBOX_PRESETS, spec_for

    preset = BLACKBOX_PRESETS["gmm1"]
    spec = spec_for("gmm1", parse_entry("sqdf-paper"), 0, 1024, 64, [], str(tmp_path), {})
    assert spec.blackbox["inner_steps"] == preset["sqdf-paper"]["blackbox"]["inner_steps"]
    spec = spec_for("gmm1", parse_entry("sqdf-paper"), 0, 1024, 64, [], str(tmp_path), {"inner_steps": 7})
    assert spec.blackbox["inner_steps"] == 7
    spec = spec_for("gmm1", parse_entry("prdp:direct"), 1, 1024, 64, ["method.lr=0.5"], str(tmp_path), {})
    assert spec.config["method"]["batch_size"] == preset["prdp:direct"]["method"]["batch_size"]
    assert spec.config["method"]["lr"] == 0.5 and spec.config["trainer"]["seed"] == 1
    assert spec.run_dir.endswith("gmm1/prdp-direct/seed1")
