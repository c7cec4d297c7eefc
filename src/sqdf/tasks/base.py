"""What a task is: a base (reference) model, a reward, conditions, and whatever is known of the optimum."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..diffusion.schedule import NoiseSchedule

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
        default=None, metadata={"help": "safetensors file of the base model: a trained MLP (toy tasks, "
                                         "base='mlp'; trained if missing) or the digits UNet (None: the shipped one)"}
    )
    base_train_steps: int = field(default=4000, metadata={"help": "optimizer steps to train an MLP base"})
    dim: int = field(default=2, metadata={"help": "dimension (Gaussian task only)"})
    num_inference_steps: int = field(default=100, metadata={"help": "sampler steps T"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta in [0, 1]; 1 is the DDPM posterior variance"})
    schedule: str = field(default="linear", metadata={"help": "noise schedule: 'linear' or 'cosine'"})
    clip_sample: float | None = field(default=None, metadata={
        "help": "clamp x0 predictions to [-c, c] in the sampler (None: no clamp; digits: 1, the data range)"})
    clip_sample_mode: str = field(default="ddpm", metadata={
        "help": "with clip_sample: 'ddpm' recomputes eps from the clamped x0 (DDPM's posterior mean, diffusers' "
                "DDPMScheduler) or 'ddim' keeps the network's eps (diffusers' DDIMScheduler)"})
    num_train_steps: int = field(default=1000, metadata={"help": "training timesteps N of the VP schedule"})
    reward: str = field(default="classifier", metadata={
        "help": "digits: 'classifier' (log p(target digit | x), differentiable), 'ink', 'png' or 'jpeg' "
                "(compressibility; black-box)"})
    target_digit: int | None = field(default=3, metadata={
        "help": "digits: the classifier reward's target digit; None: the condition's digit + digit_offset"})
    digit_offset: int = field(default=1, metadata={
        "help": "digits, with target_digit None: target = (condition + offset) mod 10 ('make a 1 look like a 2')"})
    digit_condition: str | None = field(default=None, metadata={
        "help": "digits: classes to generate: None (unconditional), 'all' (uniform over 0-9) or digits like '1,7'"})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "digits: classifier-free guidance scale of conditional sampling (1: none, the best Frechet "
                "distance of the shipped model; the shipped consistency model is distilled at 1)"})
    consistency_path: str | None = field(default=None, metadata={
        "help": "safetensors file of a consistency model (digits: None is the shipped one; toy tasks: None is "
                "~/.cache/sqdf/consistency, distilled on first use, and a missing file is distilled and written)"})
    classifier_path: str | None = field(default=None, metadata={
        "help": "digits: safetensors file of the reward/feature classifier (None: the shipped one)"})
    optimum_samples: int = field(default=2048, metadata={
        "help": "digits: base samples behind the Monte Carlo estimate of J* and the exact-target metrics"})


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
        if self.target_digit is not None and not 0 <= self.target_digit <= 9:
            raise ConfigError(f"task.target_digit={self.target_digit} must be a digit 0-9 (or None to use "
                              "the condition + task.digit_offset)")
        if not self.guidance_scale >= 0:
            raise ConfigError(f"task.guidance_scale={self.guidance_scale} must be >= 0 (1: no guidance)")
        if self.optimum_samples < 16:
            raise ConfigError(f"task.optimum_samples={self.optimum_samples} must be >= 16")


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
        from ..diffusion.schedule import ScheduleConfig

        cfg = ScheduleConfig(kind=self.config.schedule, num_train_steps=self.config.num_train_steps)
        return NoiseSchedule(cfg, self.config.num_inference_steps, self.config.eta,
                             clip_sample=self.config.clip_sample, clip_sample_mode=self.config.clip_sample_mode)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Conditions for n samples; None for unconditional tasks."""
        return None

    def known_optimum(self) -> KnownOptimum | None:
        return None

    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        """Task-specific metrics on final samples (mode weights, distances to the target); {} by default."""
        return {}

    def export_model(self, model: nn.Module, path: str) -> None:
        """Write the fine-tuned denoiser's weights to a safetensors file (atomically)."""
        import os

        from safetensors.torch import save_file

        tmp = f"{path}.tmp{os.getpid()}"
        tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp, metadata={"task": self.name})
        os.replace(tmp, path)

    def to(self, device) -> "Task":
        """Move what the task holds outside the policy (frozen decoders, reward models) to the device."""
        return self

    def proxy_features(self):
        """The feature map (``sqdf.models.features.FeatureMap``) that `sqdf blackbox` fits its proxy reward on:
        the raw sample vector by default; tasks with a frozen image encoder override it."""
        from ..models.features import RawFeatures

        return RawFeatures()

    def consistency_model(self) -> nn.Module | None:
        """A frozen consistency model f(x, t, cond) -> x0 of the reference sampler, when the task ships one."""
        return None

    @property
    def differentiable_reward(self) -> bool:
        """Whether gradients flow through ``reward`` (methods that follow them refuse a black-box reward)."""
        return True

    def plot(self, samples: torch.Tensor, path: str, title: str = "", cond: torch.Tensor | None = None) -> None:
        """Save a picture of samples against the target, when the task can draw one."""
