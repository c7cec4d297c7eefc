"""Diffusion-DPO (Wallace et al. 2024): offline DPO on (winner, loser) pairs through denoising-error differences.

Derivation. DPO on whole chains, max E[r] - beta KL(p_theta(x_{0:T}) || p_ref(x_{0:T})), has the implicit reward
beta log p_theta(x_{0:T}) / p_ref(x_{0:T}); it is intractable for a sample x_0 alone, so the paper (i) replaces the
reverse posterior p_theta(x_{1:T} | x_0) by the forward q(x_{1:T} | x_0), (ii) moves the expectation over the step t
and the noise eps outside the convex -log sigmoid (an upper bound, by Jensen), and (iii) turns each step's KL into
an eps-prediction error. One draw of (t, eps), shared by winner and loser, gives the loss the official code runs:

    err_net(x) = mean over elements of ||eps - eps_net(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t)||^2,
    L = -log sigmoid( -beta / 2 [ (err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l)) ] ).

``beta`` is the code's temperature (5000 for SD1.5 and SDXL), not a KL weight: with the mean over D elements and a
constant weighting it corresponds to a KL weight of roughly beta / (2 D T w_t). Because of (ii) the optimum of this
surrogate is not the tilted p_ref exp(r / alpha) in general (averaging the sigmoid over draws over-tilts); the
bench measures where it lands. For flow models the same loss runs on the eps error, which is the velocity error
times (1 - s). Conditions: the file's ``cond`` column (tensors layout) is passed to the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import option
from ..errors import ConfigError
from ..preferences.data import load_pairs
from .base import IterationContext, Method, MethodConfig


@dataclass
class DiffusionDPOConfig(MethodConfig):
    """Hyperparameters of Diffusion-DPO (official SD1.5: beta 5000, 2048 pairs per step, lr 1e-8 x 2048 full UNet)."""

    data: str | None = option(None, "preference file (.jsonl or .parquet: tensors, Pick-a-Pic or HPDv2 layout); "
                              "required")
    lr: float = option(1e-4, "AdamW learning rate")
    beta: float = option(5000.0, "the code's DPO temperature on per-element mean errors (official 5000)")
    pairs_per_step: int = option(64, "pairs per gradient step (drawn from the file with replacement)")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("method.data is required for diffusion-dpo: a .jsonl or .parquet preference file "
                              "(see README: preference data)")
        if not self.beta > 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0")
        if self.pairs_per_step < 1:
            raise ConfigError(f"method.pairs_per_step={self.pairs_per_step} must be >= 1")


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits [N]) from per-pair mean eps errors of policy and reference on winner and loser, each [N]."""
    logits = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
    return -F.logsigmoid(logits).mean(), logits


def training_times(schedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """n model timesteps drawn uniformly: integers 0 .. N-1 for a VP schedule, flow times 1000 s, s ~ U(0, 1)."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    if hasattr(schedule, "alphas_cumprod"):
        return (u * len(schedule.alphas_cumprod)).floor().long().clamp(max=len(schedule.alphas_cumprod) - 1)
    return (u * 1000).clamp(1e-3, 1000 - 1e-3)


def denoising_errors(policy, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond, which: str) -> torch.Tensor:
    """Per-sample mean squared eps error [N] of ``which`` network ('policy' or 'reference') at model times t [N]
    on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, eps [N, *shape]."""
    signal, noise = policy.schedule.coefficients_at(t)
    shape = (-1, *([1] * (x0.ndim - 1)))
    x_t = signal.to(x0.dtype).view(shape) * x0 + noise.to(x0.dtype).view(shape) * eps
    eps_hat, _ = policy.predict_at(x_t, t, cond, which)
    return ((eps_hat - eps) ** 2).flatten(1).mean(1)


class DiffusionDPO(Method):
    name = "diffusion-dpo"
    config_class = DiffusionDPOConfig
    offline = True

    def __init__(self, config: DiffusionDPOConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        pairs = load_pairs(config.data, policy.sample_shape)
        self.winners, self.losers, self.cond = pairs.winners_first()
        if len(self.winners) == 0:
            raise ConfigError(f"preference file {config.data!r} has no decided pair (every label is a tie 0.5)")

    def _errors(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond, which: str) -> torch.Tensor:
        return denoising_errors(self.policy, x0, t, eps, cond, which)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg, g = self.config, ctx.generator
        device = next(iter(self.policy.trainable_parameters())).device
        idx = torch.randint(0, len(self.winners), (cfg.pairs_per_step,), generator=g, device=g.device).cpu()
        w, lo = self.winners[idx].to(device), self.losers[idx].to(device)
        cond = None if self.cond is None else self.cond[idx].to(device)
        t = training_times(self.policy.schedule, cfg.pairs_per_step, g).to(device)
        eps = torch.randn(w.shape, generator=g, device=g.device, dtype=w.dtype).to(device)  # shared by w and l
        both, t2, eps2 = torch.cat([w, lo]), torch.cat([t, t]), torch.cat([eps, eps])
        cond2 = None if cond is None else torch.cat([cond, cond])
        with torch.no_grad():
            ref = self._errors(both, t2, eps2, cond2, "reference")
        self.policy.train()
        err = self._errors(both, t2, eps2, cond2, "policy")
        n = cfg.pairs_per_step
        loss, logits = diffusion_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], cfg.beta)
        stats = ctx.optimizer_step(loss)
        return {"loss": float(loss.detach()), "implicit_accuracy": float((logits.detach() > 0).float().mean()),
                "grad_norm": stats["grad_norm"]}
