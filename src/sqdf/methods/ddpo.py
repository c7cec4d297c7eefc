"""DDPO (Black et al. 2023): PPO-clip on per-step log-prob ratios with a black-box reward.

Per iteration: sample B chains with the current policy (no grad), score them, turn rewards into advantages
normalized per condition (a running window of the last ``stat_buffer_size`` rewards of each condition, once it
holds ``stat_min_count``; the batch's statistics before that), clip them to +-``adv_clip_max``, then run
``num_inner_epochs`` passes over the batch, split into ``num_minibatches`` groups of chains; each gradient step
minimizes, over every (chain, step) pair of its group,

    L = mean max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),   ratio = pi_theta(x_{k+1}|x_k) / pi_old(x_{k+1}|x_k).

The ratio is per dimension by default (``log_ratio="mean"``: exp of the log-ratio over d, as ddpo-pytorch and TRL
compute it, so clip_range = 1e-4 means the same on a 2-D toy and on a 16,384-dimensional SD1.5 latent); ``"sum"``
uses the transition's full ratio. Log-probs are summed in float64 either way (``gaussian_log_prob``).

``kl_coef > 0`` shapes the reward to r - kl_coef * path KL (the KL-regularized objective as a black-box reward).

When the rollout carries per-sample weights w (``Rollout.weights``: PrefPaint's trust in a learned reward,
``trainer.reward_model_trust``) each chain's terms are multiplied by its w, as PrefPaint's loss sum w * max(...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from .base import IterationContext, Method, MethodConfig
from .common import (
    LOG_RATIO_HELP,
    check_log_ratio,
    condition_keys,
    repeat_cond,
    sample_dim,
    step_log_ratio,
    transition_batch,
)


@dataclass
class DDPOConfig(MethodConfig):
    """Hyperparameters of DDPO (defaults: kvablack/ddpo-pytorch, except the learning rate of a full MLP)."""

    lr: float = option(1e-4, "AdamW learning rate")
    clip_range: float = option(1e-4, "PPO clip eps on the per-step probability ratio (in method.log_ratio's unit)")
    log_ratio: str = option("mean", LOG_RATIO_HELP)
    adv_clip_max: float = option(10.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    num_inner_epochs: int = option(2, "passes over each sampled batch")
    num_minibatches: int = option(1, "gradient steps per pass (the chains are split into this many groups)")
    stat_buffer_size: int = option(16, "rewards kept per condition for advantage normalization")
    stat_min_count: int = option(16, "rewards a condition needs before its own statistics are used")
    kl_coef: float = option(0.0, "reward shaping r - kl_coef * path KL; 0 is the original DDPO")
    transition_chunk: int = option(0, "transitions per forward/backward pass inside one gradient step (0: all at "
                                   "once); large models need it: B x T transitions rarely fit in one pass")

    def validate(self) -> None:
        if self.transition_chunk < 0:
            raise ConfigError(f"method.transition_chunk={self.transition_chunk} must be >= 0 (0: no chunking)")
        super().validate()
        if not self.clip_range > 0:
            raise ConfigError(f"method.clip_range={self.clip_range} must be > 0")
        check_log_ratio(self.log_ratio)
        if not self.adv_clip_max > 0:
            raise ConfigError(f"method.adv_clip_max={self.adv_clip_max} must be > 0")
        if self.num_inner_epochs < 1:
            raise ConfigError(f"method.num_inner_epochs={self.num_inner_epochs} must be >= 1")
        if not 1 <= self.num_minibatches <= self.batch_size:
            raise ConfigError(f"method.num_minibatches={self.num_minibatches} must be in [1, method.batch_size]")
        if self.stat_buffer_size < 1 or self.stat_min_count < 1:
            raise ConfigError("method.stat_buffer_size and method.stat_min_count must be >= 1")
        if self.kl_coef < 0:
            raise ConfigError(f"method.kl_coef={self.kl_coef} must be >= 0")


def ppo_clip_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean max(-A r, -A clip(r, 1-eps, 1+eps)) with r = exp(log_ratio); log_ratio, advantages [N]. ``weights``
    [N]: each term is multiplied by its weight first (PrefPaint's trust weights; still divided by N, not by the
    weights' sum, as PrefPaint does)."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    if weights is not None:
        terms = terms * weights.to(terms.dtype)
    return terms.mean()


class PerConditionStatTracker:
    """Normalizes rewards per condition with a window of its last ``buffer_size`` rewards (DDPO's tracker)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict = {}

    def advantages(self, rewards: torch.Tensor, keys: list) -> torch.Tensor:
        """(r - mean) / (std + 1e-6) per condition; rewards [B] -> [B] (float64 statistics)."""
        r = rewards.detach().to(torch.float64).cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            window = (self.history.get(key, []) + r[idx].tolist())[-self.buffer_size:]
            self.history[key] = window
            if len(window) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                w = torch.tensor(window, dtype=torch.float64)
                mean, std = w.mean(), w.std(unbiased=False)
            out[idx] = (r[idx] - mean) / (std + 1e-6)
        return out.to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict:
        return {"history": [[list(k) if k is not None else None, v] for k, v in self.history.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.history = {(tuple(k) if k is not None else None): list(v) for k, v in state["history"]}


class DDPO(Method):
    name = "ddpo"
    config_class = DDPOConfig
    uses_sample_weights = True  # Rollout.weights multiply the clipped terms of each chain's transitions

    def __init__(self, config: DDPOConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.tracker = PerConditionStatTracker(config.stat_buffer_size, config.stat_min_count)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        roll = ctx.rollout(cfg.batch_size)
        traj = roll.trajectory
        shaped = roll.rewards - cfg.kl_coef * traj.path_kl.to(roll.rewards.dtype)
        adv = self.tracker.advantages(shaped, condition_keys(traj.cond, traj.batch_size))
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        weights = None if roll.weights is None else roll.weights.to(device=adv.device, dtype=adv.dtype)
        T, d = self.policy.num_steps, sample_dim(self.policy)
        self.policy.train()
        losses, fracs, grad_norms = [], [], []
        for _ in range(cfg.num_inner_epochs):
            perm = torch.randperm(traj.batch_size, generator=ctx.generator, device=ctx.generator.device)
            for chains in perm.to(traj.states.device).chunk(cfg.num_minibatches):
                x, x_next, k = transition_batch(traj.states, chains)
                cond = repeat_cond(traj.cond, chains, T)
                old = traj.log_probs[chains].reshape(-1)
                advantages = adv[chains].repeat_interleave(T)
                chain_weights = None if weights is None else weights[chains].repeat_interleave(T)
                total = x.shape[0]
                size = cfg.transition_chunk if cfg.transition_chunk > 0 and ctx.backward is not None else total
                loss_sum, clipped = 0.0, 0.0
                for start in range(0, total, size):  # the mean over all transitions, one chunk's share at a time
                    part = slice(start, min(start + size, total))
                    log_prob = self.policy.step_log_prob(x[part], x_next[part], k[part],
                                                         None if cond is None else cond[part])
                    log_ratio = step_log_ratio(log_prob, old[part], d, cfg.log_ratio)
                    n_part = log_ratio.shape[0]
                    w = None if chain_weights is None else chain_weights[part]
                    loss = ppo_clip_loss(log_ratio, advantages[part], cfg.clip_range, w) * (n_part / total)
                    if part.stop < total:
                        ctx.backward(loss)
                    else:
                        stats = ctx.optimizer_step(loss)
                    loss_sum += float(loss.detach())
                    clipped += float(((log_ratio.detach().exp() - 1).abs() > cfg.clip_range).float().sum())
                losses.append(loss_sum)
                fracs.append(clipped / total)
                grad_norms.append(stats["grad_norm"])
        n = len(losses)
        return {"loss": sum(losses) / n, "clip_fraction": sum(fracs) / n, "grad_norm": sum(grad_norms) / n,
                "path_kl": float(traj.path_kl.mean())}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
