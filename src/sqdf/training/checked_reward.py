"""Reward wrappers: validation of what a user's reward returns, and honest query counting."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import RewardError


class CheckedReward:
    """Wraps ``fn(x [B, *shape], cond) -> [B]``: every call is validated and, unless ``count=False``, counted.

    Every evaluation counts as B queries, including a differentiable reward evaluated on an x0 estimate, so that
    methods compare at equal query budgets. Errors raised by ``fn``, NaN/inf values and wrong shapes become a
    RewardError that says what came back and what is expected.
    """

    def __init__(self, fn: Callable, name: str = "reward"):
        self.fn = fn
        self.name = name
        self.queries = 0

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None, count: bool = True) -> torch.Tensor:
        try:
            r = self.fn(x, cond)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            raise RewardError(
                f"the {self.name} function raised {type(exc).__name__}: {exc} (on a batch of shape {tuple(x.shape)}); "
                "fix the reward so it maps samples [B, ...] to rewards [B]"
            ) from exc
        if not isinstance(r, torch.Tensor):
            raise RewardError(f"the {self.name} function returned {type(r).__name__}; it must return a tensor [B]")
        if r.shape != (x.shape[0],):
            raise RewardError(
                f"the {self.name} function returned shape {tuple(r.shape)} for a batch of {x.shape[0]}; "
                f"it must return one reward per sample, shape [{x.shape[0]}]"
            )
        if not torch.isfinite(r).all():
            bad = int((~torch.isfinite(r)).sum())
            raise RewardError(
                f"the {self.name} function returned {bad} NaN/inf values out of {x.shape[0]}; "
                "make it finite for every sample (clip, or add an epsilon inside logs)"
            )
        if count:
            self.queries += x.shape[0]
        return r
