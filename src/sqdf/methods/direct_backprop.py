"""Direct reward backpropagation through the sampler: DRaFT-K, AlignProp and ReFL, each with an optional +KL term.

Per iteration: sample B chains with gradients kept only where the method wants them, score the result with the
differentiable reward, and minimize

    L = - mean r(x) + kl_weight * mean sum_k KL_k,

- DRaFT-K (Clark et al. 2024): x = x_0, gradients through the last K steps.
- AlignProp (Prabhudesai et al. 2023): x = x_0, gradients through the last K steps, K ~ U{min_k .. max_k} drawn
  anew each iteration (randomized truncated backpropagation).
- ReFL (Xu et al. 2023): stop at a state x_k with k drawn uniformly among the last ``late_steps`` grid indices,
  and x = the policy's one-step (Tweedie) prediction of x_0 from x_k, with gradients through that one prediction.

KL_k is the exact Gaussian KL of each step taken to the reference's step at the same state; outside the backprop
window its gradient is direct (the state is detached), inside it also flows through the state into both means. ``grad_checkpointing`` recomputes
each step's network call in the backward pass instead of storing its activations (memory for long windows).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..config import option
from ..errors import ConfigError
from .base import IterationContext, Method, MethodConfig


@dataclass
class DirectBackpropConfig(MethodConfig):
    """Fields every direct-backprop method has."""

    lr: float = option(1e-4, "AdamW learning rate")
    kl_weight: float | None = option(0.0, "weight of the summed per-step KL ('+KL' variant); 0: the original "
                                     "method; None: the task's alpha")
    grad_checkpointing: bool = option(False, "recompute step activations in the backward pass (saves memory)")

    def validate(self) -> None:
        super().validate()
        if self.kl_weight is not None and not self.kl_weight >= 0:
            raise ConfigError(f"method.kl_weight={self.kl_weight} must be >= 0 (or None for the task's alpha)")


@dataclass
class DRaFTConfig(DirectBackpropConfig):
    """DRaFT-K: backprop through the last K sampling steps."""

    k: int = option(1, "steps at the end of the chain that gradients flow through (K)")

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ConfigError(f"method.k={self.k} must be >= 1")


@dataclass
class AlignPropConfig(DirectBackpropConfig):
    """AlignProp: backprop through a random number K ~ U{min_k .. max_k} of final steps."""

    min_k: int = option(1, "smallest truncation K")
    max_k: int | None = option(None, "largest truncation K; None: the whole chain")

    def validate(self) -> None:
        super().validate()
        if self.min_k < 1 or (self.max_k is not None and self.max_k < self.min_k):
            raise ConfigError(f"method.min_k={self.min_k}, method.max_k={self.max_k}: need 1 <= min_k <= max_k")


@dataclass
class ReFLConfig(DirectBackpropConfig):
    """ReFL: reward of a one-step x0 prediction from a random late state."""

    late_steps: int = option(10, "the prediction starts from a grid index drawn among the last late_steps")

    def validate(self) -> None:
        super().validate()
        if self.late_steps < 1:
            raise ConfigError(f"method.late_steps={self.late_steps} must be >= 1")


def direct_loss(rewards: torch.Tensor, path_kls: torch.Tensor | None, kl_weight: float) -> torch.Tensor:
    """-mean r + kl_weight * mean path KL; rewards, path_kls [B]."""
    loss = -rewards.mean()
    if path_kls is not None and kl_weight > 0:
        loss = loss + kl_weight * path_kls.mean()
    return loss


def run_chain(
    policy, x: torch.Tensor, cond, noises: torch.Tensor, stop_at: int, grad_from: int, with_kl: bool,
    grad_checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Take steps 0 .. stop_at-1 from x [B, *shape] with noises [T, B, *shape].

    States carry gradients only from step ``grad_from`` on; before it, a step's mean is differentiated only for
    its KL (when ``with_kl``). Returns (state at grid index stop_at, summed per-step KLs [B] or None).
    """

    def mean_of(state, k):
        if grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(policy.step_mean, state, k, cond, use_reentrant=False)
        return policy.step_mean(state, k, cond)

    kl_total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype) if with_kl else None
    for k in range(stop_at):
        in_window = k >= grad_from
        if not in_window:
            x = x.detach()
        if in_window or with_kl:
            mean = mean_of(x, k)
        else:
            with torch.no_grad():
                mean = policy.step_mean(x, k, cond)
        if with_kl:
            # inside the window the state depends on theta, so the reference mean does too (through x)
            with torch.set_grad_enabled(in_window and torch.is_grad_enabled()):
                ref_mean = policy.step_mean(x, k, cond, "reference")
            kl_total = kl_total + policy.step_kl(mean, ref_mean, k)
        x = mean + policy.sigma(k) * noises[k]
        if not in_window:
            x = x.detach()
    return x, kl_total


class _DirectBackprop(Method):
    """Shared loop; subclasses choose where the chain stops, where gradients start, and what is scored."""

    config_class = DirectBackpropConfig
    needs_reward_gradient = True

    def __init__(self, config: DirectBackpropConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.kl_weight = alpha if config.kl_weight is None else config.kl_weight

    @abstractmethod
    def window(self, generator: torch.Generator) -> tuple[int, int]:
        """(stop_at, grad_from) grid indices for this iteration."""

    def scored(self, x: torch.Tensor, k: int, cond) -> torch.Tensor:
        """What the reward sees from the state x at grid index k: the state itself at k == T."""
        return x

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        B, T = cfg.batch_size, self.policy.num_steps
        g = ctx.generator
        stop_at, grad_from = self.window(g)
        cond = ctx.conditions(B)
        x = self.policy.initial_noise(B, g)
        noises = torch.randn((T, *x.shape), generator=g, device=g.device, dtype=x.dtype).to(x.device)
        self.policy.train()
        x, path_kl = run_chain(self.policy, x, cond, noises, stop_at, grad_from, self.kl_weight > 0,
                               cfg.grad_checkpointing)
        rewards = ctx.reward(self.scored(x, stop_at, cond), cond)
        loss = direct_loss(rewards, path_kl, self.kl_weight)
        stats = ctx.optimizer_step(loss)
        out = {"loss": float(loss.detach()), "reward": float(rewards.detach().mean()),
               "grad_norm": stats["grad_norm"], "backprop_steps": stop_at - grad_from}
        if path_kl is not None:
            out["path_kl"] = float(path_kl.detach().mean())
        return out


class DRaFT(_DirectBackprop):
    name = "draft"
    config_class = DRaFTConfig

    def window(self, generator):
        T = self.policy.num_steps
        return T, T - min(self.config.k, T)


class AlignProp(_DirectBackprop):
    name = "alignprop"
    config_class = AlignPropConfig

    def window(self, generator):
        T = self.policy.num_steps
        hi = min(self.config.max_k or T, T)
        lo = min(self.config.min_k, hi)
        k = int(torch.randint(lo, hi + 1, (1,), generator=generator, device=generator.device))
        return T, T - k


class ReFL(_DirectBackprop):
    name = "refl"
    config_class = ReFLConfig

    def window(self, generator):
        T = self.policy.num_steps
        late = min(self.config.late_steps, T)
        stop = int(torch.randint(T - late, T, (1,), generator=generator, device=generator.device))
        return stop, stop  # no gradient through the chain: only through the one-step prediction

    def scored(self, x, k, cond):
        return self.policy.predict(x, k, cond)[1]
