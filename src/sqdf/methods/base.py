"""What a method is: a config dataclass and a training iteration that uses tools the Trainer hands it.

The Trainer calls ``method.train_iteration(ctx)`` once per iteration. The method draws samples through
``ctx.rollout(n)`` (scored and counted), evaluates the reward through ``ctx.reward`` (counted), draws conditions
through ``ctx.conditions(n)`` when it samples by itself, and applies gradient steps through
``ctx.optimizer_step(loss)`` as often as it likes; a step too large for one backward pass sends all but its last
chunk through ``ctx.backward(chunk_loss)`` first. It never sees the Trainer itself.

Evaluation draws samples through ``method.generate``: the policy's sampler for trained methods; inference-time
methods (``trains = False``: best-of-N, FK steering) override it and spend reward queries per sample there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..config import option
from ..diffusion.policy import DiffusionPolicy, Trajectory
from ..errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, progress: float, final_fraction: float) -> float:
    """The lr multiplier at ``progress`` in [0, 1] of the run: 1 for 'constant'; for 'cosine'
    final + (1 - final) (1 + cos(pi progress)) / 2, from 1 at the start to ``final_fraction`` at the end."""
    if schedule == "constant":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * p))


@dataclass
class MethodConfig:
    """Fields every training method has."""

    batch_size: int = option(64, "trajectories sampled (and scored) per iteration")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip (per parameter group); <= 0 disables clipping")
    lr_schedule: str = option("constant", "'constant', or 'cosine': every group's lr anneals to lr_final_fraction "
                              "times its start over the run (trainer.steps, or trainer.max_queries when that budget "
                              "ends the run first)")
    lr_final_fraction: float = option(0.1, "lr_schedule=cosine: the final lr as a fraction of the start, in [0, 1]")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"method.batch_size={self.batch_size} must be >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"method.lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if not 0 <= self.lr_final_fraction <= 1:
            raise ConfigError(f"method.lr_final_fraction={self.lr_final_fraction} must be in [0, 1]")
        if not self.lr > 0:
            raise ConfigError(f"method.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"method.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class Rollout:
    """Trajectories sampled by the current policy without gradients, with their rewards [B] and optional
    per-sample weights [B] (PrefPaint's trust in a learned reward, ``trainer.reward_model_trust``); a method whose
    ``uses_sample_weights`` is True multiplies each sample's loss terms by them."""

    trajectory: Trajectory
    rewards: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass
class IterationContext:
    """The tools a method gets for one iteration."""

    iteration: int
    generator: torch.Generator  # all randomness of the method must come from here (exact resume)
    # rollout(n, cond=None, initial=None, score=True): n chains of the policy from start noise ``initial`` (None:
    # fresh), scored (counts n queries; score=False: rewards are NaN and nothing is counted)
    rollout: Callable[..., Rollout]
    reward: Callable  # reward(x, cond) -> [B], differentiable where the task is; counts B queries per call
    optimizer_step: Callable[[torch.Tensor], dict]  # backward, clip, step, zero_grad; returns {"grad_norm": ..}
    conditions: Callable[[int], "torch.Tensor | None"] = lambda n: None  # task conditions for n samples
    # backward(loss): add loss's gradient without stepping (chunks of one big step; the last goes to optimizer_step)
    backward: "Callable[[torch.Tensor], None] | None" = None
    # label(a, b, cond) -> labels [P] in {0, 0.5, 1} from trainer.labeller (budgeted, logged); None: label by reward
    label: "Callable | None" = None


@dataclass
class Generated:
    """Final samples [n, *shape] of a method's sampler with their path KL to the reference [n].

    ``path_kl`` is None when the sampler's law has no per-sample path KL that can be computed (FK steering);
    ``kl_note`` says how it was obtained.
    """

    samples: torch.Tensor
    path_kl: torch.Tensor | None
    kl_note: str = "exact: sum of per-step Gaussian KLs"


class Method(ABC):
    """Base class of every fine-tuning method. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str] = "method"
    config_class: ClassVar[type] = MethodConfig
    trains: ClassVar[bool] = True  # False: an inference-time method (no optimizer, no training loop)
    needs_reward_gradient: ClassVar[bool] = False  # True: backpropagates through the reward (refuses black-box ones)
    reads_labels: ClassVar[bool] = False  # True: asks ctx.label for online pairwise labels when a labeller is set
    offline: ClassVar[bool] = False  # True: learns from a data file, spends no reward query (not in bench defaults)
    # True: multiplies each sample's loss terms by Rollout.weights when present (trainer.reward_model_trust refuses
    # methods that would silently ignore them)
    uses_sample_weights: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, policy: DiffusionPolicy, alpha: float):
        config.validate()
        self.config = config
        self.policy = policy
        self.alpha = alpha

    @classmethod
    def reward_gradient_needed(cls, config: MethodConfig) -> bool:
        """Whether this method, with this config, backpropagates through the reward (the Trainer then refuses
        black-box rewards). Default: the class's ``needs_reward_gradient``."""
        return cls.needs_reward_gradient

    @classmethod
    def build_policy(cls, task, config, out_dir: str | None, device) -> DiffusionPolicy | None:
        """A policy of the method's own (e.g. another sampler) for ``task`` and the RunConfig ``config`` on
        ``device``, or None (the default) for the task's standard one. ``trainer.build_policy`` calls it first, so
        training, resume and ``sqdf sample`` all rebuild the same policy; it must be deterministic."""
        return None

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates."""
        return self.policy.trainable_parameters()

    def to(self, device) -> "Method":
        """Move auxiliary networks the method owns (value heads, ...) to the device; the policy is moved apart."""
        return self

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (override to give auxiliary networks their own learning rate)."""
        return [{"params": self.parameters()}]

    def generate(self, n: int, cond, generator: torch.Generator, reward: Callable) -> Generated:
        """n final samples for evaluation. ``reward`` counts the queries an inference-time method spends."""
        traj = self.policy.sample(n, cond, generator)
        return Generated(traj.samples, traj.path_kl)

    @abstractmethod
    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        """One iteration of training; returns scalar metrics to log (inference-time methods: never called)."""

    def state_dict(self) -> dict:
        """Method state beyond the policy and optimizer (e.g. a replay buffer), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ValueHeadMethod(Method):
    """A method that owns a value network ``self.value`` (set in ``__init__``), updated by the same optimizer in a
    parameter group of its own at ``config.value_lr``."""

    value: torch.nn.Module

    def to(self, device) -> "ValueHeadMethod":
        self.value.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.policy.trainable_parameters() + list(self.value.parameters())

    def param_groups(self) -> list[dict]:
        return [{"params": self.policy.trainable_parameters()},
                {"params": list(self.value.parameters()), "lr": self.config.value_lr}]


class InferenceMethod(Method):
    """A method that trains nothing and spends its reward queries while sampling (in ``generate``)."""

    trains = False

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        raise RuntimeError(f"{self.name} is an inference-time method; it has no training iterations")
