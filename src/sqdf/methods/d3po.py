"""D3PO (Yang et al. 2024): DPO on every denoising step of online pairs, with labels from preferences.

Per iteration: draw P = B / 2 start noises (and conditions) and sample two chains from each, so the two chains of a
pair share the condition and x_T (the official code does this); label each pair by a Bradley-Terry comparison of
the task reward at temperature tau (``label_temperature``; each label costs the two reward queries of its chains);
then minimize, over every step k of every decided pair (ties carry no gradient),

    L = -mean_pairs sum_k log sigmoid( beta [h_k(w) - h_k(l)] ),   h_k = log pi_theta(a_k|s_k) - log pi_ref(a_k|s_k),

with the final label reused at every step (the sum over steps: the official code takes one optimizer step per
step k; at theta = ref the sum has the gradient of DPO on whole chains).

Derivation. DPO on whole chains with the path log-ratio h = sum_k h_k targets p_ref exp(r / (beta tau)), the
Bradley-Terry optimum. With ``trainer.labeller`` set, the labels come from it instead (a person or a program,
through the budgeted label log; the chains are then not scored). D3PO splits that logistic term into one per step:
the first step stays exact (both chains start from one state), but later steps fit the behaviour policy's expected
reward of the pair's continuations rather than the soft Q (PREFERENCES.md 10.4), so the fixed point is near, not at,
the tilt. ``beta`` defaults to
alpha / tau, the weight whose path-level optimum is the task's p*. The official code's setting is
``log_ratio="mean"`` with beta 0.1 and ``ratio_clip=0.1``: per-element log-probs, and the ratio to the frozen
reference clamped to [0.9, 1.1], which bounds how far any step can move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from ..preferences.labels import bradley_terry_labels, decided, preference_loss
from .base import IterationContext, Method, MethodConfig
from .common import LOG_RATIO_HELP, check_pairwise_dpo, implicit_reward_weight, reference_log_ratios


@dataclass
class D3POConfig(MethodConfig):
    """Hyperparameters of D3PO (official: beta 0.1, clip 0.1, lr 3e-5, per-element log-probs, LoRA on SD1.5)."""

    lr: float = option(1e-4, "AdamW learning rate")
    beta: float | None = option(None, "DPO weight on the per-step log-ratios; None: alpha / label_temperature "
                                "(with log_ratio='mean': times the sample's dimension), whose path-level optimum "
                                "is the task's tilted target")
    label_temperature: float = option(1.0, "Bradley-Terry temperature of the labels drawn from the task reward "
                                      "(0: the deterministic comparison)")
    log_ratio: str = option("sum", LOG_RATIO_HELP + "; D3PO's default 'sum' (nats), the official code 'mean'")
    ratio_clip: float | None = option(None, "clamp each step's ratio to the reference to [1 - eps, 1 + eps] (in "
                                      "method.log_ratio's unit; the official 0.1 with log_ratio='mean'); None: "
                                      "no clamp")
    inner_steps: int = option(1, "gradient steps per sampled batch of pairs")

    def validate(self) -> None:
        super().validate()
        check_pairwise_dpo(self)
        if self.ratio_clip is not None and not 0 < self.ratio_clip < 1:
            raise ConfigError(f"method.ratio_clip={self.ratio_clip} must be in (0, 1) (or None: no clamp)")
        if self.inner_steps < 1:
            raise ConfigError(f"method.inner_steps={self.inner_steps} must be >= 1")


def d3po_loss(h_a: torch.Tensor, h_b: torch.Tensor, labels: torch.Tensor, beta: float,
              ratio_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, margins [P, T]) of D3PO: the per-step logistic losses summed over steps, averaged over decided pairs.
    h_a, h_b [P, T]: per-step log-ratios to the reference of the two chains of
    each pair (with grad); labels [P] (1: a won, 0: b won, 0.5: tie, no gradient). With ``ratio_clip`` each h is
    clamped to [log(1 - eps), log(1 + eps)] first (zero gradient outside, as the official clamp)."""
    if ratio_clip is not None:
        lo, hi = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
        h_a, h_b = h_a.clamp(lo, hi), h_b.clamp(lo, hi)
    margins = beta * (h_a - h_b)
    keep = decided(labels)
    if not bool(keep.any()):
        return margins.sum() * 0.0, margins
    per_step = preference_loss(margins, labels[:, None].expand_as(margins))  # ties: 0
    return per_step.sum(1)[keep].mean(), margins


class D3PO(Method):
    name = "d3po"
    config_class = D3POConfig
    reads_labels = True

    def __init__(self, config: D3POConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.beta = implicit_reward_weight(config.beta, alpha, policy, config.log_ratio, config.label_temperature)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        pairs = cfg.batch_size // 2
        cond = ctx.conditions(pairs)
        if cond is not None:
            cond = cond.repeat_interleave(2, dim=0)
        start = self.policy.initial_noise(pairs, ctx.generator).repeat_interleave(2, dim=0)
        if ctx.label is not None:  # trainer.labeller: a person or program labels the pairs, no reward query
            traj = ctx.rollout(2 * pairs, cond, start, score=False).trajectory
            x = traj.samples
            labels = ctx.label(x[0::2], x[1::2], None if cond is None else cond[0::2]).cpu()
        else:
            roll = ctx.rollout(2 * pairs, cond, start)
            traj = roll.trajectory
            rewards = roll.rewards.view(pairs, 2)
            labels = bradley_terry_labels(rewards[:, 0], rewards[:, 1], cfg.label_temperature, ctx.generator)
        self.policy.train()
        losses, accs, grad_norms = [], [], []
        for _ in range(cfg.inner_steps):
            h = reference_log_ratios(self.policy, traj, cfg.log_ratio).view(pairs, 2, -1)
            loss, margins = d3po_loss(h[:, 0], h[:, 1], labels.to(h.device), self.beta, cfg.ratio_clip)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            grad_norms.append(stats["grad_norm"])
            keep = decided(labels).to(h.device)
            sign = (labels.to(h.device) * 2 - 1)[:, None]
            accs.append(float(((margins.detach() * sign) > 0).float()[keep].mean()) if bool(keep.any()) else 0.5)
        return {"loss": sum(losses) / len(losses), "implicit_accuracy": sum(accs) / len(accs),
                "ties": float((labels == 0.5).float().mean()), "grad_norm": sum(grad_norms) / len(grad_norms),
                "path_kl": float(traj.path_kl.mean())}
