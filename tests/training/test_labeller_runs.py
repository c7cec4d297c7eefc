"""Runs whose online labels come from trainer.labeller: a file of answers (stop, answer, resume) and localhost HTTP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sqdf.errors import ConfigError
from sqdf.preferences.labellers import LabelsPending
from sqdf.training.run_setup import default_config
from sqdf.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**extra):
    config = default_config("d3po", "gaussian")
    settings = {"trainer.steps": 1, "trainer.eval_every": 0, "trainer.eval_samples": 64, "trainer.progress": False,
                "trainer.tensorboard": False, "trainer.plots": False, "trainer.floor": False, "trainer.device": "cpu",
                "task.num_inference_steps": 4, "method.batch_size": 8, **extra}
    for key, value in settings.items():
        config.set(key, value, raw=False)
    return config


def test_answer_file_run_stops_for_answers_then_resumes(tmp_path):
    answers, out = tmp_path / "answers.jsonl", tmp_path / "run"
    trainer = Trainer("gaussian", "d3po", _config(**{"trainer.labeller": f"answers:{answers}"}), str(out))
    with pytest.raises(LabelsPending, match="4 pairs need labels"):
        trainer.train()
    questions = [json.loads(line) for line in (out / "questions" / "questions.jsonl").read_text().splitlines()]
    tensors = load_file(str(out / "questions" / questions[0]["file"]))
    with answers.open("w") as fh:  # the "person": a wins when its first coordinate is larger
        for q in questions:
            a, b = tensors["a"][q["index"]], tensors["b"][q["index"]]
            fh.write(json.dumps({"pair": q["pair"], "label": float(a[0] > b[0])}) + "\n")
    summary = Trainer.resume(str(out)).train()
    assert summary["iterations"] == 1 and summary["labels_spent"] == 4
    assert summary["reward_queries"] == 0  # the chains were never scored
    logged = load_file(str(next((out / "labels").glob("labels_*.safetensors"))))
    torch.testing.assert_close(logged["labels"], (logged["a"][:, 0] > logged["b"][:, 0]).float())


def test_http_labeller_run_ends_when_the_label_budget_is_spent(tmp_path, json_server):
    url = json_server(lambda body: {"labels": [float(x[0] > y[0]) for x, y in zip(body["a"], body["b"])]})
    config = _config(**{"trainer.steps": 100, "trainer.labeller": url, "trainer.label_budget": 10})
    summary = Trainer("gaussian", "d3po", config, str(tmp_path / "run")).train()
    assert summary["labels_spent"] == 10 and summary["iterations"] == 3  # 4 + 4 + the 2 the budget still buys
    assert summary["reward_queries"] == 0


def test_labeller_needs_a_method_that_reads_labels_and_a_valid_spec(tmp_path):
    config = default_config("ddpo", "gaussian")
    config.set("trainer.labeller", "answers:x.jsonl", raw=False)
    with pytest.raises(ConfigError, match="does not ask for labels; use d3po"):
        Trainer("gaussian", "ddpo", config, str(tmp_path / "r"))
    for key, value, match in (("trainer.labeller", "ftp://x", "must be 'http"),
                              ("trainer.label_budget", -1, "label_budget=-1")):
        config = _config(**{key: value})
        with pytest.raises(ConfigError, match=match):
            config.trainer.validate()
    with pytest.raises(ConfigError, match="applies to trainer.labeller"):
        _config(**{"trainer.label_budget": 5}).trainer.validate()
