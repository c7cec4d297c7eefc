"""Shared helpers for the method tests: a short real training run on the Gaussian task."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def train_on_gaussian(tmp_path):
    """train_on_gaussian(method, steps, **{key: value}) -> (base evaluation, final summary)."""
    return lambda method, steps, **overrides: _train_on_gaussian(method, tmp_path, steps, **overrides)


def _train_on_gaussian(method: str, tmp_path, steps: int, **overrides) -> tuple[dict, dict]:
    """(base evaluation, final summary) of `method` on the 2-D Gaussian task with 10 sampler steps."""
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    config = default_config(method)
    settings = {"trainer.steps": steps, "trainer.eval_every": 0, "trainer.eval_samples": 1024,
                "trainer.checkpoint_every": 10_000, "trainer.progress": False, "trainer.tensorboard": False,
                "trainer.plots": False, "trainer.floor": False, "trainer.device": "cpu",
                "task.num_inference_steps": 10, **overrides}
    for key, value in settings.items():
        config.set(key, value, raw=False)
    trainer = Trainer("gaussian", method, config, str(tmp_path / method))
    base, _ = trainer.evaluate()
    return base, trainer.train()
