"""Load a fine-tuned policy back from a run directory, and draw samples from it (``sqdf sample``).

``load_run(path)`` accepts a run directory (its newest checkpoint) or one checkpoint file
``DIR/checkpoints/ckpt_*.pt`` and rebuilds the task, the policy (fine-tuned weights + frozen reference) and the
method exactly as the run had them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError


@dataclass
class LoadedRun:
    task_name: str
    method_name: str
    iteration: int
    config: object  # RunConfig
    task: object  # Task
    policy: object  # DiffusionPolicy
    method: object  # Method


def _locate(path: str) -> tuple[str, str | None]:
    """(run directory, checkpoint file or None for the newest) of a run dir or a checkpoint path."""
    if os.path.isdir(path):
        return path, None
    if os.path.isfile(path) and path.endswith(".pt"):
        return os.path.dirname(os.path.dirname(os.path.abspath(path))), path
    raise CheckpointError(f"{path!r} is neither a run directory nor a checkpoint file (DIR/checkpoints/ckpt_*.pt); "
                          "pass the --out directory of a `sqdf train` run")


def load_run(path: str, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished or interrupted run's policy from its config.yaml and a checkpoint."""
    from .checkpoint import load_latest_checkpoint
    from .run_setup import build_policy, load_trainable_state, make_task, method_class, read_run_config

    run_dir, ckpt = _locate(path)
    task_name, method_name, config = read_run_config(run_dir)
    if ckpt is None:
        iteration, state, _ = load_latest_checkpoint(run_dir)
    else:
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            iteration = int(state["iteration"])
        except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
            raise CheckpointError(f"checkpoint {ckpt!r} is corrupted or not a sqdf checkpoint ({exc})") from exc
    task = make_task(task_name, config.task)
    policy = build_policy(task, config, run_dir, torch.device(device))
    load_trainable_state(policy.model, state["model"])
    method = method_class(method_name)(config.method, policy, task.alpha)
    method.to(device)
    return LoadedRun(task_name, method_name, iteration, config, task, policy, method)


def parse_cond(task, text: str | None, n: int, generator: torch.Generator):
    """Conditions for n samples: the task's own draw (text None) or a comma list of labels cycled over n."""
    if text is None:
        return task.sample_conditions(n, generator)
    try:
        labels = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError as exc:
        raise CheckpointError(f"--cond {text!r} must be comma-separated integer labels like 3 or 1,7") from exc
    if not labels:
        raise CheckpointError(f"--cond {text!r} names no label")
    return torch.tensor(labels, dtype=torch.long).repeat(-(-n // len(labels)))[:n]


def sample_run(run: LoadedRun, n: int, seed: int = 0, cond: str | None = None, reference: bool = False):
    """(samples [n, *shape], cond, rewards [n]) from the run's method (or from the frozen reference)."""
    from .checked_reward import CheckedReward

    g = torch.Generator(device=run.policy._device()).manual_seed(seed)
    c = parse_cond(run.task, cond, n, g)
    if c is not None:
        c = c.to(run.policy._device())
    reward = CheckedReward(run.task.reward, name=f"{run.task_name} reward")
    run.policy.eval()
    if reference:
        samples = run.policy.sample(n, c, g, which="reference", with_reference=False).samples
    else:
        samples = run.method.generate(n, c, g, reward).samples
    with torch.no_grad():
        rewards = reward(samples, c, count=False)
    return samples, c, rewards
