"""DRO (Richemond et al. 2024; used by DSO): regression of pointwise scores on the implicit reward, no pairs.

Per iteration: sample B chains of the current policy and score each final sample once (a pointwise score: the
task reward, or any black-box score); then take ``inner_steps`` gradient steps on

    L = mean_i 1/2 ( r_i - V(x_T,i, c_i) - beta h_i )^2,    h_i = sum_k [log pi_theta(a_k|s_k) - log pi_ref(a_k|s_k)],

where V is a learned value of the start state and condition, fit in the same loss (its own learning rate).
Derivation: for any sampling distribution with full support, the minimizer over the policy and V of
E[(r - V - beta log pi/pi_ref)^2] sets beta log pi_theta(x_{T-1:0} | x_T) / pi_ref(.. | x_T) = r(x_0) - V(x_T) for
every chain, so pi_theta = pi_ref exp(r / beta) / exp(V / beta) with V(x_T) the soft value beta log E_ref[exp(r /
beta) | x_T]: the KL-regularized optimum, the task's p* for beta = alpha (the default). Unlike DPO it needs no
pairs and no labels, only one score per sample, and its optimum does not depend on the sampling policy; DSO's
variant with no reference and no value (mean error difference of stable and unstable samples) has no finite
optimum and is not this one. ``log_ratio="mean"`` divides h by the sample's dimension (then beta is per element).

Offline, from a file of scores (``method.data``: columns x, score, cond; ``sqdf pairs TASK --scores``): a file
holds final samples only, not their chains, so h is replaced by Diffusion-DPO's one-draw bound on the path
log-ratio, h(x) ~ -(1/2) [err_theta(x, t, eps) - err_ref(x, t, eps)] in the code units of ``offline_beta`` (the
mean eps error over elements at a random (t, eps)), and V by a value of the condition alone:
L = mean 1/2 (r - V(c) + offline_beta/2 [err_theta - err_ref])^2. Its fixed point is a surrogate's (the bound of
Diffusion-DPO, PREFERENCES.md 10.3), and the samples' own distribution now matters (x0 only where the file has
support); the bench measures where it lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from ..models.value import ValueMLP
from ..preferences.data import load_scores
from .base import IterationContext, MethodConfig, ValueHeadMethod
from .common import LOG_RATIO_HELP, check_log_ratio, implicit_reward_weight, reference_log_ratios, sample_dim
from .diffusion_dpo import denoising_errors, training_times


@dataclass
class DROConfig(MethodConfig):
    """Hyperparameters of DRO."""

    lr: float = option(1e-4, "AdamW learning rate of the policy")
    beta: float | None = option(None, "weight of the implicit reward beta log pi / pi_ref; None: the task's alpha "
                                "(with log_ratio='mean': times the sample's dimension)")
    log_ratio: str = option("sum", LOG_RATIO_HELP + "; DRO's default 'sum' (nats)")
    inner_steps: int = option(1, "gradient steps per sampled batch")
    value_lr: float = option(1e-3, "learning rate of the value V(x_T, c)")
    value_hidden: int = option(128, "width of the value MLP")
    data: str | None = option(None, "offline DRO: a file of scored samples (.jsonl or .parquet with columns x, "
                              "score and optionally cond; `sqdf pairs TASK --scores`); None: online, one score per "
                              "sampled chain")
    offline_beta: float = option(5000.0, "offline DRO: weight of the error-difference implicit reward, in the code "
                                 "units of diffusion-dpo's beta (per-element mean errors)")
    samples_per_step: int = option(64, "offline DRO: scored samples per gradient step (drawn with replacement)")

    def validate(self) -> None:
        super().validate()
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (or None for the task's alpha)")
        check_log_ratio(self.log_ratio)
        for name in ("inner_steps", "value_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method.{name}={getattr(self, name)} must be >= 1")
        if not self.value_lr > 0:
            raise ConfigError(f"method.value_lr={self.value_lr} must be > 0")
        if not self.offline_beta > 0:
            raise ConfigError(f"method.offline_beta={self.offline_beta} must be > 0")
        if self.samples_per_step < 1:
            raise ConfigError(f"method.samples_per_step={self.samples_per_step} must be >= 1")


def dro_loss(rewards: torch.Tensor, values: torch.Tensor, h: torch.Tensor, beta: float) -> torch.Tensor:
    """mean 1/2 (r - V - beta h)^2 over samples; rewards, values (with grad), h (with grad) all [B]."""
    return 0.5 * ((rewards - values - beta * h) ** 2).mean()


class DRO(ValueHeadMethod):
    name = "dro"
    config_class = DROConfig

    def __init__(self, config: DROConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.beta = implicit_reward_weight(config.beta, alpha, policy, config.log_ratio)
        cond_dim = getattr(policy.model, "cond_dim", 0)
        self.value = ValueMLP(sample_dim(policy), config.value_hidden, num_train_steps=policy.num_steps,
                              cond_dim=cond_dim)
        self.scores = None if config.data is None else load_scores(config.data, policy.sample_shape)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        if self.scores is not None:
            return self._offline_iteration(ctx)
        cfg = self.config
        roll = ctx.rollout(cfg.batch_size)
        traj = roll.trajectory
        B, start = traj.batch_size, traj.states[:, 0]
        self.policy.train()
        losses, grad_norms = [], []
        for _ in range(cfg.inner_steps):
            h = reference_log_ratios(self.policy, traj, cfg.log_ratio).sum(1)
            values = self.value(start, torch.zeros(B, dtype=torch.long, device=start.device), traj.cond)
            loss = dro_loss(roll.rewards.to(h.dtype), values.to(h.dtype), h, self.beta)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            grad_norms.append(stats["grad_norm"])
        return {"loss": sum(losses) / len(losses), "value_mean": float(values.detach().mean()),
                "grad_norm": sum(grad_norms) / len(grad_norms), "path_kl": float(traj.path_kl.mean())}

    def _offline_iteration(self, ctx: IterationContext) -> dict[str, float]:
        """One step of offline DRO on ``samples_per_step`` scored samples of the file (see the module docstring)."""
        cfg, g, data = self.config, ctx.generator, self.scores
        device = next(iter(self.policy.trainable_parameters())).device
        idx = torch.randint(0, len(data), (cfg.samples_per_step,), generator=g, device=g.device).cpu()
        x0, r = data.x[idx].to(device), data.scores[idx].to(device)
        cond = None if data.cond is None else data.cond[idx].to(device)
        t = training_times(self.policy.schedule, cfg.samples_per_step, g).to(device)
        eps = torch.randn(x0.shape, generator=g, device=g.device, dtype=x0.dtype).to(device)
        with torch.no_grad():
            ref = denoising_errors(self.policy, x0, t, eps, cond, "reference")
        self.policy.train()
        err = denoising_errors(self.policy, x0, t, eps, cond, "policy")
        implicit = -0.5 * cfg.offline_beta * (err - ref)
        zeros = torch.zeros_like(x0)
        values = self.value(zeros, torch.zeros(len(idx), dtype=torch.long, device=device), cond)
        loss = 0.5 * ((r - values.to(implicit.dtype) - implicit) ** 2).mean()
        stats = ctx.optimizer_step(loss)
        return {"loss": float(loss.detach()), "value_mean": float(values.detach().mean()),
                "grad_norm": stats["grad_norm"]}
