"""What a task is: a base (reference) model, a reward, conditions, and whatever is known of the optimum."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..schedule import NoiseSchedule

RewardFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class TaskConfig:
    """Options shared by the built-in tasks (each task reads those it needs)."""

    alpha: float | None = field(
        default=None, metadata={"help": "KL weight of the objective J = E[r] - alpha KL; None: the task's default"}
    )
    base: str = field(
        default="exact", metadata={"help": "base model: 'exact' (analytic score, no training) or 'mlp' (trained)"}
    )
    base_path: str | None = field(
        default=None, metadata={"help": "safetensors file of a trained MLP base (base='mlp'); trained if missing"}
    )
    base_train_steps: int = field(default=4000, metadata={"help": "optimizer steps to train an MLP base"})
    dim: int = field(default=2, metadata={"help": "dimension (Gaussian task only)"})
    num_inference_steps: int = field(default=100, metadata={"help": "sampler steps T"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta in [0, 1]; 1 is the DDPM posterior variance"})
    schedule: str = field(default="linear", metadata={"help": "noise schedule: 'linear' or 'cosine'"})
    num_train_steps: int = field(default=1000, metadata={"help": "training timesteps N of the VP schedule"})


    def validate(self) -> None:
        import math

        from ..errors import ConfigError

        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"task.alpha={self.alpha} must be a positive number (it weights the KL; try 1.0)")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"task.eta={self.eta} must be in [0, 1] (1 = DDPM posterior variance, 0 = DDIM)")
        if self.num_inference_steps < 1 or self.num_inference_steps >= self.num_train_steps:
            raise ConfigError(f"task.num_inference_steps={self.num_inference_steps} must be in "
                              f"[1, task.num_train_steps={self.num_train_steps})")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"task.schedule={self.schedule!r} must be 'linear' or 'cosine'")
        if self.base not in ("exact", "mlp"):
            raise ConfigError(f"task.base={self.base!r} must be 'exact' or 'mlp'")


@dataclass
class KnownOptimum:
    """What is known about the optimum of J = E[r] - alpha KL for a task."""

    optimum: float  # J*
    reward_mean: float | None = None  # E_{p*}[r]
    kl: float | None = None  # KL(p* || p_ref)
    optimum_stderr: float = 0.0  # 0 for a closed form
    method: str = "closed form"
    mode_weights: list[float] | None = None


class Task(ABC):
    """A fine-tuning problem. Subclasses provide the reward, the base denoiser and the optimum when known."""

    name: str = "task"
    description: str = ""

    def __init__(self, config: TaskConfig):
        self.config = config

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def alpha(self) -> float: ...

    @abstractmethod
    def reward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """r(x, cond) for samples x [B, *shape] -> [B]; differentiable where the task allows."""

    @abstractmethod
    def build_reference(self, schedule: NoiseSchedule, out_dir: str | None = None) -> nn.Module:
        """The frozen base denoiser."""

    @abstractmethod
    def build_policy_model(self, reference: nn.Module) -> nn.Module:
        """The trainable denoiser, equal to the reference at initialization."""

    def make_schedule(self) -> NoiseSchedule:
        from ..schedule import ScheduleConfig

        cfg = ScheduleConfig(kind=self.config.schedule, num_train_steps=self.config.num_train_steps)
        return NoiseSchedule(cfg, self.config.num_inference_steps, self.config.eta)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Conditions for n samples; None for unconditional tasks."""
        return None

    def known_optimum(self) -> KnownOptimum | None:
        return None

    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        """Task-specific metrics on final samples (mode weights, distances to the target); {} by default."""
        return {}

    def plot(self, samples: torch.Tensor, path: str, title: str = "") -> None:
        """Save a picture of samples against the target, when the task can draw one."""
