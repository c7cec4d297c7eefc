"""The Python examples in docs/api.md run as written (those that need a finished run folder are run on a tiny one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)


def test_api_page_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_api_example_runs(index, tmp_path, monkeypatch, one_thread):
    code = _blocks()[index]
    monkeypatch.chdir(tmp_path)
    if "runs/my-digits-run" in code:  # a digits run's model file: the shipped UNet written as a run writes it
        from sqdf.digits import load_shipped, save_model

        unet, _ = load_shipped("unet")
        (tmp_path / "runs" / "my-digits-run").mkdir(parents=True)
        save_model(unet, tmp_path / "runs" / "my-digits-run" / "model.safetensors", "unet")
    if "runs/my-run" in code:
        from sqdf.training.run_setup import default_config
        from sqdf.training.trainer import Trainer

        config = default_config("sqdf", "gaussian")
        config.update({"trainer": {"steps": 1, "eval_samples": 16, "plots": False, "tensorboard": False, "progress": False,
                                   "floor": False}, "method": {"batch_size": 4}})
        Trainer("gaussian", "sqdf", config, str(tmp_path / "runs" / "my-run")).train()
    exec(compile(code, f"docs/api.md example {index}", "exec"), {})
