"""`sqdf pairs`: labelled pairs of a task's base model, written for diffusion-dpo; bad input exits 2."""

from __future__ import annotations

import pytest
import torch

from sqdf.cli import main
from sqdf.preferences import load_pairs
from sqdf.training.preference_pairs import reference_pairs


def test_pairs_are_labelled_by_the_reward():
    pairs = reference_pairs("gaussian", 64, temperature=0.0, settings={"task.num_inference_steps": 10})
    assert pairs.a.shape == (64, 2) and pairs.b.shape == (64, 2)
    from sqdf.training.run_setup import make_task

    task = make_task("gaussian")
    r_a, r_b = task.reward(pairs.a), task.reward(pairs.b)
    torch.testing.assert_close(pairs.labels, (r_a > r_b).float())
    again = reference_pairs("gaussian", 64, temperature=0.0, settings={"task.num_inference_steps": 10})
    torch.testing.assert_close(again.a, pairs.a)  # seeded


def test_cli_writes_a_file_diffusion_dpo_reads(tmp_path, capsys):
    out = tmp_path / "p.parquet"
    assert main(["pairs", "gmm1", "--n", "16", "--out", str(out), "--set", "task.num_inference_steps=10"]) == 0
    assert len(load_pairs(str(out), (2,))) == 16
    assert "wrote 16 preference pairs" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--n", "0"], "--n 0"),
    (["--temperature", "-1"], "--temperature"),
    (["--set", "method.lr=1"], "task keys only"),
    (["--out", "pairs.csv"], ".jsonl or .parquet"),
])
def test_bad_pairs_invocations_exit_2(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert main(["pairs", "gaussian", "--n", "4", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_scores_are_the_rewards_of_base_samples(tmp_path, capsys):
    from sqdf.preferences.data import load_scores
    from sqdf.training.run_setup import make_task

    out = tmp_path / "s.jsonl"
    assert main(["pairs", "gaussian", "--scores", "--n", "16", "--out", str(out),
                 "--set", "task.num_inference_steps=10"]) == 0
    scores = load_scores(str(out), (2,))
    assert "wrote 16 scored samples" in capsys.readouterr().out
    torch.testing.assert_close(scores.scores, make_task("gaussian").reward(scores.x).float())
