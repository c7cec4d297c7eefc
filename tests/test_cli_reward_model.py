"""`sqdf reward-model`: fit on a pairs file, write a model that loads, report held-out accuracy; bad input exits 2
with one line; `sqdf train --set trainer.reward_model=...` refuses a missing model the same way."""

from __future__ import annotations

import pytest
import torch

from sqdf.cli import main
from sqdf.models.features import RawFeatures
from sqdf.preferences import PreferencePairs, PreferenceRewardModel, bradley_terry_labels, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--ensemble", "2", "--hidden", "16", "--epochs", "40"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(120, 2, generator=g), torch.randn(120, 2, generator=g)
    w = torch.tensor([2.0, -1.0])
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    return write_pairs(PreferencePairs(a, b, bradley_terry_labels(a @ w, b @ w, 0.5, g)), str(path))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("sqdf: error: "), err
    return lines[0]


def test_fits_writes_and_reports_held_out_accuracy(tmp_path, capsys, pairs_file):
    out = tmp_path / "rm.safetensors"
    assert main(["reward-model", pairs_file, "--task", "gmm1", "--out", str(out), *FAST, "--seed", "3",
                 "--set", "task.num_inference_steps=8"]) == 0
    text = capsys.readouterr().out
    assert "fit on 108 pairs" in text and "held-out accuracy" in text and "on 12 pairs" in text
    assert "trainer.reward_model=" in text
    model = PreferenceRewardModel.load(str(out), RawFeatures(), sample_shape=(2,))
    assert (model.ensemble, model.hidden, model.seed) == (2, 16, 3)
    assert model.info["task"] == "gmm1" and model.info["heldout_pairs"] == 12
    assert model.info["heldout_accuracy"] > 0.6


@pytest.mark.parametrize("argv,needle", [
    (["--out", "model.pt"], "safetensors file"),
    (["--set", "method.lr=1"], "task keys only"),
    (["--holdout", "1.5"], "--holdout 1.5"),
    (["--ensemble", "0"], "ensemble=0"),
    (["--task", "gmm"], "unknown task 'gmm'"),
])
def test_bad_invocations_exit_2_with_one_line(tmp_path, monkeypatch, capsys, pairs_file, argv, needle):
    monkeypatch.chdir(tmp_path)
    base = {"--task": "gmm1", "--out": "rm.safetensors"}
    for flag in ("--task", "--out"):
        if flag in argv:
            base.pop(flag)
    extra = [item for pair in base.items() for item in pair]
    assert main(["reward-model", pairs_file, *extra, *argv]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)


def test_missing_or_mismatched_pairs_exit_2(tmp_path, capsys):
    assert main(["reward-model", str(tmp_path / "none.jsonl"), "--task", "gmm1", "--out",
                 str(tmp_path / "rm.safetensors")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    three = write_pairs(PreferencePairs(torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4)), str(tmp_path / "p.jsonl"))
    capsys.readouterr()  # the writer's progress bars
    assert main(["reward-model", three, "--task", "gmm1", "--out", str(tmp_path / "rm.safetensors")]) == 2
    assert "shape (3,)" in _one_error_line(capsys.readouterr().err)


def test_train_with_a_missing_reward_model_exits_2(tmp_path, capsys):
    assert main(["train", "gmm1", "--method", "ddpo", "--steps", "1", "--out", str(tmp_path / "run"),
                 "--set", f"trainer.reward_model={tmp_path / 'none.safetensors'}",
                 "--set", "trainer.device=cpu", "--set", "trainer.progress=false"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "none.safetensors" in line and "does not exist" in line and "sqdf reward-model" in line
