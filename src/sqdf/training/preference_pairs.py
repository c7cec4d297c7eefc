"""Preference pairs of a task's base model, labelled by Bradley-Terry on the task's reward (``sqdf pairs``).

Each pair is two independent reference chains under one condition; its label is drawn with
P(a > b) = sigmoid((r(a) - r(b)) / tau). With tau = 1 and a DPO weight of alpha, the population optimum of exact
path-level DPO on such pairs is the task's tilted target p_ref exp(r / alpha) / Z, the same p* the reward-based
methods are scored against.
"""

from __future__ import annotations

import torch

from ..preferences.data import PointwiseScores, PreferencePairs, write_pairs
from ..preferences.labels import bradley_terry_labels
from .run_setup import build_policy, default_config, make_task


def _base_model(task_name: str, settings: dict | None):
    """(task, policy in eval mode on the CPU) of ``task_name`` with the task.KEY values of ``settings``."""
    config = default_config("sqdf", task_name)
    for key, value in (settings or {}).items():
        config.set(key, value)
    task = make_task(task_name, config.task)
    policy = build_policy(task, config, None, "cpu")
    policy.eval()
    return task, policy


def reference_pairs(task_name: str, n: int, temperature: float = 1.0, seed: int = 0,
                    settings: dict | None = None, batch: int = 1024) -> PreferencePairs:
    """n labelled pairs of base-model samples of ``task_name`` (``settings``: task.KEY values, e.g. the alpha)."""
    if n < 1:
        raise ValueError(f"--n {n} must be >= 1 pair")
    task, policy = _base_model(task_name, settings)
    g = torch.Generator().manual_seed(seed)
    parts_a, parts_b, parts_y, parts_c = [], [], [], []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        cond = task.sample_conditions(m, g)
        both = None if cond is None else cond.repeat_interleave(2, dim=0)
        x = policy.sample(2 * m, both, g, which="reference", with_reference=False).samples
        with torch.no_grad():
            r = task.reward(x, both).view(m, 2)
        parts_y.append(bradley_terry_labels(r[:, 0], r[:, 1], temperature, g))
        parts_a.append(x[0::2])
        parts_b.append(x[1::2])
        if cond is not None:
            parts_c.append(cond)
    return PreferencePairs(torch.cat(parts_a), torch.cat(parts_b), torch.cat(parts_y),
                           torch.cat(parts_c) if parts_c else None)


def reference_scores(task_name: str, n: int, seed: int = 0, settings: dict | None = None,
                     batch: int = 1024) -> PointwiseScores:
    """n base-model samples of ``task_name`` with their task rewards (for offline DRO)."""
    if n < 1:
        raise ValueError(f"--n {n} must be >= 1 sample")
    task, policy = _base_model(task_name, settings)
    g = torch.Generator().manual_seed(seed)
    xs, rs, cs = [], [], []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        cond = task.sample_conditions(m, g)
        x = policy.sample(m, cond, g, which="reference", with_reference=False).samples
        with torch.no_grad():
            rs.append(task.reward(x, cond).to(torch.float32))
        xs.append(x)
        if cond is not None:
            cs.append(cond)
    return PointwiseScores(torch.cat(xs), torch.cat(rs), torch.cat(cs) if cs else None)


def write_reference_pairs(task_name: str, n: int, out: str, temperature: float = 1.0, seed: int = 0,
                          settings: dict | None = None) -> str:
    """``reference_pairs`` written to ``out`` (.jsonl or .parquet); returns the path."""
    return write_pairs(reference_pairs(task_name, n, temperature, seed, settings), out)
