"""Two CPU processes (gloo, through accelerate): each samples its own chains, gradients are averaged, and the
policies stay identical across processes."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from sqdf.trainer import Trainer, default_config

    cfg = default_config("sqdf", "gaussian")
    cfg.update({"task": {"num_inference_steps": 10}, "method": {"batch_size": 8, "lr": 1e-2},
                "trainer": {"steps": 3, "device": "cpu", "eval_every": 0, "eval_samples": 32, "tensorboard": False,
                            "progress": False, "plots": False}})
    trainer = Trainer("gaussian", "sqdf", cfg, os.path.join(out, "run"))
    assert trainer.accelerator.num_processes == world
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.policy.model)
    torch.save({"params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                "chains": trainer.method.buffer.states[:8].clone()}, os.path.join(out, f"rank{rank}.pt"))


def test_two_processes_share_gradients_but_not_chains(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(r0["chains"], r1["chains"])  # each process sampled its own chains
    assert torch.allclose(r0["params"], r1["params"], atol=1e-6)  # ... yet the synced updates keep one policy
    assert (tmp_path / "run" / "summary.json").exists()  # written once, by the main process
