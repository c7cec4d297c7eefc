"""Helpers several methods share: flattening chains into transitions, condition keys."""

from __future__ import annotations

import torch


def condition_keys(cond: torch.Tensor | None, n: int) -> list:
    """A hashable key per sample: its condition's values (one shared key for unconditional tasks)."""
    if cond is None:
        return [None] * n
    flat = cond.detach().reshape(n, -1).cpu().tolist()
    return [tuple(row) for row in flat]


def transition_batch(states: torch.Tensor, chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (chain, step) transition of the given chains, flattened: (x [b*T, *shape], x_next, k [b*T])."""
    sub = states[chains]
    b, t1 = sub.shape[:2]
    x = sub[:, :-1].reshape(b * (t1 - 1), *sub.shape[2:])
    x_next = sub[:, 1:].reshape(b * (t1 - 1), *sub.shape[2:])
    k = torch.arange(t1 - 1, device=states.device).repeat(b)
    return x, x_next, k


def repeat_cond(cond: torch.Tensor | None, chains: torch.Tensor, num_steps: int) -> torch.Tensor | None:
    """Conditions of the chosen chains, each repeated for its num_steps transitions."""
    return None if cond is None else cond[chains].repeat_interleave(num_steps, dim=0)
