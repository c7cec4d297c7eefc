"""Two CPU processes (gloo, through accelerate): each samples its own chains, gradients are averaged, and the
policies stay identical across processes; for a small MLP policy and for a LoRA policy on a tiny SD pipeline."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradients(trainer, rank: int, sync: bool) -> torch.Tensor:
    """Gradient of a loss on this rank's own states, with (sync) or without (no_sync) DDP's all-reduce."""
    model, policy = trainer.policy.model, trainer.policy
    g = torch.Generator().manual_seed(100 + rank)
    x = policy.initial_noise(4, g, torch.device("cpu"))
    cond = trainer.task.sample_conditions(4, g)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with contextlib.nullcontext() if sync else model.no_sync():
        policy.step_mean(x, 1, cond).pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def _worker(rank: int, world: int, port: int, out: str, task: str, settings: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    cfg = default_config("sqdf", task)
    cfg.update({"method": {"batch_size": 8 if task == "gaussian" else 2, "lr": 1e-2},
                "trainer": {"steps": 3 if task == "gaussian" else 1, "device": "cpu", "eval_every": 0,
                            "eval_samples": 32 if task == "gaussian" else 2, "tensorboard": False,
                            "progress": False, "plots": False}})
    for key, value in settings.items():
        cfg.set(key, value, raw=False)
    trainer = Trainer(task, "sqdf", cfg, os.path.join(out, "run"))
    assert trainer.accelerator.num_processes == world
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.policy.model)
    torch.save({"params": torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]),
                "chains": trainer.method.buffer.states[:2].clone(),
                "local_grad": _gradients(trainer, rank, sync=False),
                "synced_grad": _gradients(trainer, rank, sync=True)}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("task", ["gaussian", "sd15-aesthetic"])
def test_two_processes_share_gradients_but_not_chains(tmp_path, task):
    settings: dict = {"task.num_inference_steps": 10}
    if task != "gaussian":
        from sqdf.sd.pipelines import tiny_pipeline_path
        from sqdf.sd.tiny import write_tiny_reward_weights

        settings = {"task.num_inference_steps": 2, "task.model": tiny_pipeline_path("sd15", str(tmp_path / "m")),
                    "task.reward_weights": write_tiny_reward_weights("aesthetic", str(tmp_path / "r"))}
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), task, settings), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(r0["chains"], r1["chains"])  # each process sampled its own chains
    assert torch.allclose(r0["params"], r1["params"], atol=1e-6)  # ... yet the synced updates keep one policy
    assert not torch.allclose(r0["local_grad"], r1["local_grad"])  # different data, different local gradients
    torch.testing.assert_close(r0["synced_grad"], r1["synced_grad"])  # all-reduced: the same on both
    torch.testing.assert_close(r0["synced_grad"], (r0["local_grad"] + r1["local_grad"]) / 2, rtol=1e-4, atol=1e-7)
    assert (tmp_path / "run" / "summary.json").exists()  # written once, by the main process
