"""Tiny random diffusers pipelines (written once per test session) and a helper that runs the Trainer on them."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pipes(tmp_path_factory):
    """{kind: folder} of tiny random sd15 / sdxl / sd3 pipelines in diffusers' layout."""
    from sqdf.sd.pipelines import tiny_pipeline_path

    root = str(tmp_path_factory.mktemp("tiny_pipes"))
    return {kind: tiny_pipeline_path(kind, root) for kind in ("sd15", "sdxl", "sd3")}


@pytest.fixture(scope="session")
def tiny_reward_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture
def sd_run(tiny_pipes, tiny_reward_root, tmp_path):
    """sd_run(task, method, steps=1, out=None, **settings) -> Trainer (built, not trained) on a tiny pipeline."""
    from sqdf.sd.tiny import write_tiny_reward_weights
    from sqdf.tasks import SD_TASKS, tiny_overrides
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    def build(task: str, method: str, steps: int = 1, out: str | None = None, **settings) -> Trainer:
        config = default_config(method, task)
        config.update(tiny_overrides(method))
        kind, reward, _ = SD_TASKS[task]
        base = {"trainer.steps": steps, "trainer.eval_samples": 2, "trainer.plots": False, "trainer.tensorboard": False,
                "trainer.progress": False, "trainer.device": "cpu", "task.num_inference_steps": 2,
                "task.model": tiny_pipes[kind],
                "task.reward_weights": write_tiny_reward_weights(reward, tiny_reward_root)}
        for key, value in {**base, **settings}.items():
            config.set(key, value, raw=False)
        torch.set_num_threads(1)
        return Trainer(task, method, config, out or str(tmp_path / f"{task}-{method}"))

    return build
