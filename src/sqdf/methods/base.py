"""What a method is: a config dataclass and a training iteration that uses tools the Trainer hands it.

The Trainer calls ``method.train_iteration(ctx)`` once per iteration. The method draws samples through
``ctx.rollout(n)`` (scored and counted), evaluates the reward through ``ctx.reward`` (counted), and applies
gradient steps through ``ctx.optimizer_step(loss)`` as often as it likes. It never sees the Trainer itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..config import option
from ..errors import ConfigError
from ..policy import DiffusionPolicy, Trajectory


@dataclass
class MethodConfig:
    """Fields every training method has."""

    batch_size: int = option(64, "trajectories sampled (and scored) per iteration")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip; <= 0 disables clipping")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"method.batch_size={self.batch_size} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"method.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"method.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class Rollout:
    """Trajectories sampled by the current policy without gradients, with their rewards [B]."""

    trajectory: Trajectory
    rewards: torch.Tensor


@dataclass
class IterationContext:
    """The tools a method gets for one iteration."""

    iteration: int
    generator: torch.Generator  # all randomness of the method must come from here (exact resume)
    rollout: Callable[[int], Rollout]  # sample n chains with the policy, score them (counts n queries)
    reward: Callable  # reward(x, cond) -> [B], differentiable where the task is; counts B queries per call
    optimizer_step: Callable[[torch.Tensor], dict]  # backward, clip, step, zero_grad; returns {"grad_norm": ..}


class Method(ABC):
    """Base class of every fine-tuning method. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str] = "method"
    config_class: ClassVar[type] = MethodConfig

    def __init__(self, config: MethodConfig, policy: DiffusionPolicy, alpha: float):
        config.validate()
        self.config = config
        self.policy = policy
        self.alpha = alpha

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates."""
        return self.policy.trainable_parameters()

    @abstractmethod
    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        """One iteration of training; returns scalar metrics to log."""

    def state_dict(self) -> dict:
        """Method state beyond the policy and optimizer (e.g. a replay buffer), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
