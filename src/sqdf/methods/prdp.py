"""PRDP (Deng et al. 2024): reward-difference prediction with proximal updates, black-box reward.

Per iteration: snapshot the sampling policy (its per-step log-probs are stored with the chains), draw
B / G conditions and G chains for each, score them, then take ``inner_steps`` gradient steps on the loss over
all G-choose-2 pairs (a, b) of every group:

    r_hat(x) = sum_k [log pi_theta(x_{k+1}|x_k) - log pi_ref(x_{k+1}|x_k)]            (or the mean over k)
    e(a, b)  = (r_hat(a) - r_hat(b) - (r(a) - r(b)) / beta)^2
    L        = mean max(e, e_clipped),

where e_clipped uses per-step log-ratios clipped to [old - eps, old + eps] (old: the sampling policy's; eps in
the unit of ``log_ratio``: the full step log-ratio, or per dimension, eps * d on it; log-probs summed in float64).
At zero loss r_hat = r / beta + const per condition: with beta = alpha that is the optimum of
E[r] - alpha KL, so ``beta`` defaults to the task's alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from .base import IterationContext, Method, MethodConfig
from .common import LOG_RATIO_HELP, check_log_ratio, repeat_cond, sample_dim, transition_batch

REDUCTIONS = ("sum", "mean")


@dataclass
class PRDPConfig(MethodConfig):
    """Hyperparameters of PRDP (paper defaults are for SD; the learning rate here is for a full MLP)."""

    lr: float = option(1e-4, "AdamW learning rate")
    group_size: int = option(16, "chains per condition (B in the paper); pairs are formed inside groups")
    inner_steps: int = option(10, "gradient steps per sampled batch (K)")
    beta: float | None = option(None, "reward scale: targets are reward differences / beta; None: task alpha")
    clip_eps: float = option(1e-2, "proximal clip of each per-step log-ratio around the sampling policy's")
    reduction: str = option("sum", "r_hat over steps: 'sum' (the path log-ratio) or 'mean' (the JAX code)")
    log_ratio: str = option("sum", LOG_RATIO_HELP + "; here the unit of clip_eps only (r_hat is always the full "
                            "log-ratio, which the reward difference / beta targets); default 'sum'")

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise ConfigError(f"method.group_size={self.group_size} must be >= 2 (pairs need two chains)")
        if self.batch_size % self.group_size:
            raise ConfigError(f"method.batch_size={self.batch_size} must be a multiple of "
                              f"method.group_size={self.group_size}")
        if self.inner_steps < 1:
            raise ConfigError(f"method.inner_steps={self.inner_steps} must be >= 1")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (or None for the task's alpha)")
        if not self.clip_eps > 0:
            raise ConfigError(f"method.clip_eps={self.clip_eps} must be > 0")
        check_log_ratio(self.log_ratio)
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"method.reduction={self.reduction!r} must be one of {REDUCTIONS}")


def pair_indices(num_groups: int, group_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All unordered pairs (a, b), a < b, inside consecutive groups of ``group_size`` chains: two [P] tensors."""
    a, b = torch.triu_indices(group_size, group_size, offset=1, device=device)
    offsets = torch.arange(num_groups, device=device)[:, None] * group_size
    return (a[None] + offsets).reshape(-1), (b[None] + offsets).reshape(-1)


def prdp_loss(
    log_ratios: torch.Tensor, old_log_ratios: torch.Tensor, rewards: torch.Tensor, pairs: tuple,
    beta: float, clip_eps: float, reduction: str = "sum",
) -> torch.Tensor:
    """Proximal reward-difference loss. log_ratios (with grad), old_log_ratios [N, T] per-step
    log pi - log pi_ref of the current and the sampling policy; rewards [N]; pairs = (a [P], b [P])."""
    reduce = (lambda v: v.sum(1)) if reduction == "sum" else (lambda v: v.mean(1))  # noqa: E731
    clipped = torch.maximum(torch.minimum(log_ratios, old_log_ratios + clip_eps), old_log_ratios - clip_eps)
    a, b = pairs
    target = (rewards[a] - rewards[b]) / beta
    r_hat, r_hat_clipped = reduce(log_ratios), reduce(clipped)
    err = (r_hat[a] - r_hat[b] - target) ** 2
    err_clipped = (r_hat_clipped[a] - r_hat_clipped[b] - target) ** 2
    return torch.maximum(err, err_clipped).mean()


class PRDP(Method):
    name = "prdp"
    config_class = PRDPConfig

    def __init__(self, config: PRDPConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.beta = alpha if config.beta is None else config.beta

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        groups = cfg.batch_size // cfg.group_size
        cond = ctx.conditions(groups)
        if cond is not None:
            cond = cond.repeat_interleave(cfg.group_size, dim=0)
        roll = ctx.rollout(cfg.batch_size, cond)
        traj = roll.trajectory
        B, T = traj.batch_size, self.policy.num_steps
        chains = torch.arange(B, device=traj.states.device)
        x, x_next, k = transition_batch(traj.states, chains)
        flat_cond = repeat_cond(traj.cond, chains, T)
        ref_lp = traj.ref_log_probs
        old = traj.log_probs - ref_lp
        rewards = roll.rewards.to(old.dtype)
        pairs = pair_indices(groups, cfg.group_size, device=old.device)
        eps = cfg.clip_eps * (sample_dim(self.policy) if cfg.log_ratio == "mean" else 1)
        self.policy.train()
        losses, grad_norms = [], []
        for _ in range(cfg.inner_steps):
            log_probs = self.policy.step_log_prob(x, x_next, k, flat_cond).view(B, T)
            loss = prdp_loss(log_probs - ref_lp, old, rewards, pairs, self.beta, eps, cfg.reduction)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            grad_norms.append(stats["grad_norm"])
        return {"loss": sum(losses) / len(losses), "loss_first": losses[0],
                "grad_norm": sum(grad_norms) / len(grad_norms), "path_kl": float(traj.path_kl.mean())}
