"""`sqdf bench --preferences`: label budgets per kind of method, the label tables, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os

import pytest

from sqdf.bench import preference_bench as pb
from sqdf.cli import main
from sqdf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_labels():
    assert pb.parse_labels("1024,256, 256") == [256, 1024]
    for bad in ("1", "x", ""):
        with pytest.raises(ConfigError, match="--preferences"):
            pb.parse_labels(bad)


def test_budget_of_each_kind_of_method():
    d3po = pb.budget_settings("d3po", 256, 16384, 200, "D")
    assert d3po["trainer.max_queries"] == 512  # two scored samples per label
    assert pb.budget_settings("dro", 256, 16384, 200, "D")["trainer.max_queries"] == 256  # one score per label
    off = pb.budget_settings("diffusion-dpo", 256, 16384, 200, "D")
    assert off["method.data"] == os.path.join("D", "pairs.parquet") and off["trainer.steps"] == 200
    assert off["trainer.max_queries"] == 0
    rm = pb.budget_settings("ddpo+rm", 256, 16384, 200, "D")
    assert rm["trainer.reward_model"] == os.path.join("D", "reward_model.safetensors")
    assert rm["trainer.max_queries"] == 16384
    with pytest.raises(ConfigError, match="not one"):
        pb.budget_settings("d3po+rm", 256, 16384, 200, "D")
    with pytest.raises(ConfigError, match="inference-time"):
        pb.budget_settings("best_of_n", 256, 16384, 200, "D")


def test_labels_table_means_and_bold():
    rows = [{"task": "t", "method": m, "labels": n, "seed": s, "regret": v}
            for m, n, s, v in [("a", 16, 0, 1.0), ("a", 16, 1, 3.0), ("b", 16, 0, 1.5), ("a", 64, 0, 0.5),
                               ("b", 64, 0, 0.25)]]
    rows.append({"task": "t", "method": "b", "labels": 64, "seed": 1, "error": "boom"})
    text = pb.labels_table("t", rows, ["a", "b"], [16, 64], "regret", ".3f", "min", "Regret:")
    lines = text.splitlines()
    assert lines[2] == "| method | 16 labels | 64 labels |"
    assert lines[4] == "| a | 2.000 ± 1.414 | 0.500 |"
    assert lines[5] == "| b | **1.500** | **0.250** (1 failed) |"


TINY = ["--seeds", "1", "--jobs", "1", "--eval-samples", "64", "--offline-steps", "4", "--queries", "64",
        "--set", "task.num_inference_steps=6", "--set", "method.batch_size=8", "--set", "method.pairs_per_step=8"]


def test_tiny_preference_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "p"
    methods = "d3po,dro,diffusion-dpo,inpo,ddpo+rm"
    code = main(["bench", "gaussian", "--preferences", "16,32", "--methods", methods, "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 10 and not [r for r in rows if "error" in r]
    by = {(r["method"], r["labels"]): r for r in rows}
    assert 64 <= by[("d3po", 32)]["reward_queries"] < 64 + 8  # 32 labels = 64 reward queries
    assert 32 <= by[("dro", 32)]["reward_queries"] < 32 + 8
    assert by[("diffusion-dpo", 16)]["reward_queries"] == 0 and by[("inpo", 16)]["reward_queries"] == 0
    assert by[("ddpo+rm", 16)]["learned_reward"] is not None  # trained on the model, scored by the true reward
    for n in (16, 32):
        assert (out / "data" / "gaussian" / f"L{n}" / "seed0" / "pairs.parquet").exists()
        assert (out / "data" / "gaussian" / f"L{n}" / "seed0" / "reward_model.safetensors").exists()
    table = (out / "table.md").read_text()
    assert "sqdf bench gaussian --preferences 16,32" in table
    assert "| method | 16 labels | 32 labels |" in table and "| ddpo+rm |" in table
    assert (out / "plots" / "regret_vs_labels_gaussian.png").stat().st_size > 1000
    assert main(["bench", "gaussian", "--preferences", "16,32", "--methods", methods, "--out", str(out), *TINY]) == 0
    assert "reusing 10, running 0" in capsys.readouterr().out


def test_bad_preference_bench_arguments_exit_2(tmp_path, capsys):
    assert main(["bench", "gaussian", "--preferences", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--preferences" in capsys.readouterr().err
    assert main(["bench", "gaussian", "--preferences", "16", "--methods", "d3po+rm", "--out",
                 str(tmp_path / "p")]) == 2
    assert "'+rm' trains a reward-based method" in capsys.readouterr().err
    assert main(["bench", "gaussian", "--offline-steps", "3", "--out", str(tmp_path / "p")]) == 2
    assert "--offline-steps applies to --preferences" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
