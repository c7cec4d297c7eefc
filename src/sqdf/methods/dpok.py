"""DPOK (Fan et al. 2023): policy gradient with a per-step KL penalty and a learned value baseline.

Per iteration: sample B chains (no grad) and score them with the black-box reward; then ``inner_steps`` times
draw ``pairs_per_step`` (chain, step k) transitions of the batch and minimize

    L = mean [ max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta KL_k ] + value_coef mean (V(x_k, k) - r)^2,

with A = r - V(x_k, k) (V detached in A), ratio = pi_theta / pi_old of the stored transition, and KL_k the exact
Gaussian KL of the policy's step to the reference's step at x_k (differentiated directly, as in DPOK's
KL-regularized update). The value network has its own learning rate. Each batch is used for the inner steps only
(on-policy with clipped importance ratios, as PPO); DPOK's official code also replays older batches. The ratio is
the transition's full one by default (``log_ratio="sum"``; log-probs summed in float64, so re-scoring a transition
in another batch layout leaves it at 1 to ~1e-11 even at d = 16,384); ``"mean"`` clips the per-dimension ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.schedule import gaussian_log_prob
from ..errors import ConfigError
from ..models.value import ValueMLP
from .base import IterationContext, MethodConfig, ValueHeadMethod
from .common import LOG_RATIO_HELP, check_log_ratio, sample_dim, step_log_ratio
from .ddpo import ppo_clip_loss


@dataclass
class DPOKConfig(MethodConfig):
    """Hyperparameters of DPOK."""

    lr: float = option(1e-4, "AdamW learning rate of the policy")
    beta: float | None = option(None, "weight of the per-step KL penalty; None: the task's alpha")
    inner_steps: int = option(4, "gradient steps per sampled batch")
    pairs_per_step: int = option(1024, "(chain, step) transitions per gradient step")
    clip_range: float = option(1e-2, "clip eps on the importance ratio pi_theta / pi_old (in method.log_ratio's "
                               "unit)")
    log_ratio: str = option("sum", LOG_RATIO_HELP + "; DPOK's default 'sum' bounds the full transition ratio")
    value_lr: float = option(1e-3, "learning rate of the value network")
    value_coef: float = option(1.0, "weight of the value regression loss")
    value_hidden: int = option(128, "width of the value MLP")

    def validate(self) -> None:
        super().validate()
        if self.beta is not None and not self.beta >= 0:
            raise ConfigError(f"method.beta={self.beta} must be >= 0 (or None for the task's alpha)")
        for name in ("inner_steps", "pairs_per_step", "value_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method.{name}={getattr(self, name)} must be >= 1")
        if not self.clip_range > 0:
            raise ConfigError(f"method.clip_range={self.clip_range} must be > 0")
        check_log_ratio(self.log_ratio)
        if not self.value_lr > 0:
            raise ConfigError(f"method.value_lr={self.value_lr} must be > 0")


def dpok_loss(
    log_ratio: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor, kls: torch.Tensor,
    beta: float, clip_range: float, value_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, policy part) over N transitions; all inputs [N]; ``values`` carries the value net's grad."""
    advantages = rewards - values.detach()
    policy_loss = ppo_clip_loss(log_ratio, advantages, clip_range) + beta * kls.mean()
    value_loss = ((values - rewards) ** 2).mean()
    return policy_loss + value_coef * value_loss, policy_loss


class DPOK(ValueHeadMethod):
    name = "dpok"
    config_class = DPOKConfig

    def __init__(self, config: DPOKConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.beta = alpha if config.beta is None else config.beta
        numel = sample_dim(policy)
        cond_dim = getattr(policy.model, "cond_dim", 0)
        self.value = ValueMLP(numel, config.value_hidden, num_train_steps=policy.num_steps, cond_dim=cond_dim)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        roll = ctx.rollout(cfg.batch_size)
        traj = roll.trajectory
        B, T = traj.batch_size, self.policy.num_steps
        self.policy.train()
        losses, kls, grad_norms = [], [], []
        for _ in range(cfg.inner_steps):
            flat = torch.randint(0, B * T, (cfg.pairs_per_step,), generator=ctx.generator,
                                 device=ctx.generator.device).to(traj.states.device)
            chain, k = flat // T, flat % T
            x, x_next = traj.states[chain, k], traj.states[chain, k + 1]
            cond = None if traj.cond is None else traj.cond[chain]
            mean, std = self.policy.step_distribution(x, k, cond)
            with torch.no_grad():
                ref_mean = self.policy.step_mean(x, k, cond, "reference")
            log_ratio = step_log_ratio(gaussian_log_prob(x_next, mean, std), traj.log_probs[chain, k],
                                       sample_dim(self.policy), cfg.log_ratio)
            kl = self.policy.step_kl(mean, ref_mean, k)
            values = self.value(x, k, cond)
            loss, _ = dpok_loss(log_ratio, roll.rewards[chain].to(values.dtype), values, kl, self.beta,
                                cfg.clip_range, cfg.value_coef)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            kls.append(float(kl.detach().mean()))
            grad_norms.append(stats["grad_norm"])
        n = len(losses)
        return {"loss": sum(losses) / n, "step_kl": sum(kls) / n, "grad_norm": sum(grad_norms) / n}

    def state_dict(self) -> dict:
        return {"value": self.value.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.value.load_state_dict(state["value"])
