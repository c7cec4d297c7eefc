"""SQDF: reparameterized policy gradient of a training-free soft Q-function estimate.

Per iteration: sample B chains (no grad), score them, add them to a ring replay buffer; then ``replay_ratio``
times draw pairs (chain i, step k) from the buffer and minimize

    L = - mean_i [ gamma^(T-1-k_i) r(x0_hat(x'_i), c_i) - alpha * KL_k_i ],   x'_i = mu_theta(x_i) + sigma_k eps_i,

where x_i is the stored state before step k, x0_hat is the estimator's clean-sample estimate of x'_i (x'_i itself
at the last step), and KL_k is the exact Gaussian KL of the policy step to the reference step at x_i.
Gradients reach theta through one policy call per pair (through r, x0_hat and x'_i, and through KL_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.estimators import ESTIMATORS, make_estimator
from ..errors import ConfigError
from .base import IterationContext, Method, MethodConfig
from .replay_buffer import SAMPLING_MODES, ReplayBuffer

KL_FORMS = ("exact", "official")


@dataclass
class SQDFConfig(MethodConfig):
    """Hyperparameters of SQDF (defaults follow the official code where it applies to the task)."""

    gamma: float = option(0.9, "discount over denoising steps, in (0, 1]; reward weight gamma^(T-1-k)")
    alpha: float | None = option(None, "KL weight; None: the task's alpha (the objective's)")
    kl_form: str = option("exact", "'exact': ||dmu||^2/(2 sigma^2) summed; 'official': mean over dims of "
                          "||dmu||^2/sigma^2 (the official code's scaling)")
    estimator: str = option("tweedie", f"x0 estimator for the soft value: one of {sorted(ESTIMATORS)}; "
                            "'consistency' uses the task's distilled consistency model (digits ships one)")
    estimator_steps: int = option(10, "DDIM steps of the 'ode' estimator (probability-flow solve to t = 0)")
    buffer_size: int = option(1024, "replay buffer capacity (trajectories); must be >= batch_size")
    replay_ratio: int = option(1, "gradient steps per iteration")
    train_batch_size: int | None = option(None, "(chain, step) pairs per gradient step; None: batch_size")
    sampling: str = option("reward_gamma_per", f"buffer sampling rule: one of {SAMPLING_MODES}")

    def validate(self) -> None:
        super().validate()
        if not (0 < self.gamma <= 1):
            raise ConfigError(f"method.gamma={self.gamma} must be in (0, 1]; 1 means no discount")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"method.alpha={self.alpha} must be > 0 (or None to use the task's alpha)")
        if self.kl_form not in KL_FORMS:
            raise ConfigError(f"method.kl_form={self.kl_form!r} must be one of {KL_FORMS}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"method.estimator={self.estimator!r} must be one of {sorted(ESTIMATORS)}")
        if self.buffer_size < self.batch_size:
            raise ConfigError(
                f"method.buffer_size={self.buffer_size} is smaller than method.batch_size={self.batch_size}; "
                "raise buffer_size to at least the batch size"
            )
        if self.replay_ratio < 1:
            raise ConfigError(f"method.replay_ratio={self.replay_ratio} must be >= 1")
        if self.train_batch_size is not None and self.train_batch_size < 1:
            raise ConfigError(f"method.train_batch_size={self.train_batch_size} must be >= 1")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"method.sampling={self.sampling!r} must be one of {SAMPLING_MODES}")


def sqdf_loss(
    rewards: torch.Tensor, kls: torch.Tensor, steps_to_go: torch.Tensor, gamma: float, alpha: float
) -> torch.Tensor:
    """L = -mean(gamma^n * r - alpha * KL) for rewards, kls, steps_to_go (n = T-1-k) all [B]."""
    discount = torch.as_tensor(gamma, dtype=rewards.dtype, device=rewards.device) ** steps_to_go.to(rewards.dtype)
    return -(discount * rewards - alpha * kls).mean()


class SQDF(Method):
    name = "sqdf"
    config_class = SQDFConfig
    needs_reward_gradient = True

    def __init__(self, config: SQDFConfig, policy, alpha: float):
        super().__init__(config, policy, alpha if config.alpha is None else config.alpha)
        kwargs = {"num_steps": config.estimator_steps} if config.estimator == "ode" else {}
        self.estimator = make_estimator(config.estimator, **kwargs)
        self.buffer = ReplayBuffer(config.buffer_size, policy.num_steps, device=policy._device())

    def step_kl(self, mean: torch.Tensor, ref_mean: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per-pair KL [B] in the configured form."""
        if self.config.kl_form == "exact":
            return self.policy.step_kl(mean, ref_mean, k)
        sigma = self.policy.sigma_of(mean, k)
        return (((mean - ref_mean) / sigma) ** 2).flatten(1).mean(1)

    def pair_loss(self, x: torch.Tensor, k: torch.Tensor, cond, noise: torch.Tensor, reward) -> tuple:
        """Loss over pairs (state x [B, *shape] before step k [B]); returns (loss, rewards, kls)."""
        x_next, mean, ref_mean = self.policy.reparameterized_step(x, k, cond, noise)
        x0_hat = self.estimator(self.policy, x_next, k + 1, cond)
        r = reward(x0_hat, cond)
        kl = self.step_kl(mean, ref_mean, k)
        steps_to_go = self.policy.num_steps - 1 - k
        return sqdf_loss(r, kl, steps_to_go, self.config.gamma, self.alpha), r, kl

    def reset_buffer(self) -> None:
        """Empty the replay buffer (the black-box loop does it each round: old chains were scored by an old proxy)."""
        self.buffer.clear()

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        roll = ctx.rollout(cfg.batch_size)
        self.buffer.add(roll.trajectory.states, roll.rewards, roll.trajectory.cond)
        n_pairs = cfg.train_batch_size or cfg.batch_size
        losses, kls, grad_norms = [], [], []
        for _ in range(cfg.replay_ratio):
            idx, k = self.buffer.sample_pairs(n_pairs, cfg.sampling, ctx.generator, cfg.gamma)
            x = self.buffer.states[idx, k]
            cond = None if self.buffer.conds is None else self.buffer.conds[idx]
            noise = torch.randn(x.shape, generator=ctx.generator, device=ctx.generator.device).to(x.device)
            loss, _, kl = self.pair_loss(x, k, cond, noise, ctx.reward)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            kls.append(float(kl.detach().mean()))
            grad_norms.append(stats.get("grad_norm", float("nan")))
        n = len(losses)
        return {
            "loss": sum(losses) / n,
            "step_kl": sum(kls) / n,
            "grad_norm": sum(grad_norms) / n,
            "buffer_size": len(self.buffer),
        }

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
