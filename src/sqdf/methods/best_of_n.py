"""Best-of-N: draw N chains of the (untrained) policy per output sample and keep the one with the highest reward.

Costs N reward queries per output sample. Its law has density n F(r)^(N-1) relative to the base when the reward
is continuous (F: the reward's CDF under the base), so the KL to the base, of x0 and of the whole path alike, is
exactly log N - (N - 1) / N (Beirami et al. 2024; an upper bound when rewards tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from .base import Generated, InferenceMethod, MethodConfig


@dataclass
class BestOfNConfig(MethodConfig):
    """Best-of-N sampling (no training: the MethodConfig fields are unused)."""

    n: int = option(8, "candidates per output sample (reward queries per sample)")

    def validate(self) -> None:
        super().validate()
        if self.n < 1:
            raise ConfigError(f"method.n={self.n} must be >= 1")


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n for a continuous reward."""
    return math.log(n) - (n - 1) / n


def pick_best(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the best candidate in each consecutive group of n; rewards [G * n] -> flat indices [G]."""
    groups = rewards.view(-1, n)
    return groups.argmax(1) + torch.arange(groups.shape[0], device=rewards.device) * n


class BestOfN(InferenceMethod):
    name = "best_of_n"
    config_class = BestOfNConfig

    @torch.no_grad()
    def generate(self, n: int, cond, generator: torch.Generator, reward) -> Generated:
        N = self.config.n
        big_cond = None if cond is None else cond.repeat_interleave(N, dim=0)
        traj = self.policy.sample(n * N, big_cond, generator, with_reference=False)
        rewards = reward(traj.samples, big_cond)
        best = pick_best(rewards, N)
        kl = torch.full((n,), best_of_n_kl(N), device=rewards.device)
        return Generated(traj.samples[best], kl, "exact for a continuous reward: log N - (N-1)/N")
