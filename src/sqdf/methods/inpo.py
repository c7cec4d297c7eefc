"""InPO / DDIM-InPO (Lu et al. 2025, arXiv 2503.18454): Diffusion-DPO on the latents that DDIM inversion of the
current policy assigns to the preferred and rejected samples.

Single-step view. With a deterministic (DDIM, eta = 0) sampler, a latent x_t determines its sample, and the
model can be read as a one-step generator x_t -> x_0 whose output x0_hat(x_t) = (x_t - n_t eps_net(x_t, t)) / s_t
(s_t, n_t the schedule's signal and noise, sqrt(abar_t) and sqrt(1 - abar_t) for VP). Put a Gaussian of a fixed
width around that output, p_net(x_0 | x_t) = N(x0_hat, c^2 I). Then, for a pair (x_t, x_0) related by
x_t = s_t x_0 + n_t eps, the residual is x_0 - x0_hat = (n_t / s_t) (eps_net - eps), so the per-latent implicit
reward of DPO,

    beta' log p_theta(x_0 | x_t) / p_ref(x_0 | x_t) = -beta' n_t^2 / (2 c^2 s_t^2) [ ||eps - eps_theta||^2
                                                                               - ||eps - eps_ref||^2 ],

is a difference of eps errors. Bradley-Terry DPO on a winner (x_t^w -> x_0^w) and a loser (x_t^l -> x_0^l) with
every constant folded into one temperature is therefore Diffusion-DPO's logistic loss (``diffusion_dpo_loss``):

    L = -log sigmoid( -beta / 2 [ (err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l)) ] ),
    err_net(x) = mean over elements of ||eps(x) - eps_net(x_t(x), t)||^2.

What changes is which latent the reward is attached to. Diffusion-DPO draws x_t from the forward q(x_t | x_0)
with fresh noise: most of those latents are ones from which the model would never have produced x_0, so the
preference signal is spread thinly over states off the model's generation path. InPO instead runs DDIM
inversion with the current policy (no gradient): deterministic DDIM steps run upward from x_0,

    x_{g'} = s_{g'} x0_hat(x_g, g) + n_{g'} eps_hat(x_g, g) (+ eta_inv * posterior std * z),

along a coarse grid 0 = g_0 < g_1 < .. < g_{K-1} (K = ``inversion_steps``, 10 in the official code) up to the
largest grid time <= t, the latent the policy's own sampler would (approximately) carry back to x_0. Its noise is
then back-solved, eps = (x_inv - s_t x_0) / n_t, so x_inv = s_t x_0 + n_t eps holds exactly and the network is
evaluated at (x_inv, t) as in Diffusion-DPO; the gap between the grid time reached and t is absorbed into eps.
Each sample of a pair gets its own inversion (the noise is not shared), at the pair's shared t. The reward thus
lands on the state that is actually responsible for the sample, which the paper argues makes the implicit reward
denser (fewer wasted draws) and lets it converge in a few hundred steps. ``inversion_noise`` (eta_inv, official
0.1) adds that fraction of the DDPM posterior std between consecutive grid points after each inverse step, so
the latents cover a small neighbourhood of the deterministic path rather than one point.

What its optimum is. This is a surrogate, like Diffusion-DPO's per-timestep bound, and its optimum is not the
tilted target p_ref exp(r / alpha) / Z in general: (i) the expectation over (t, latent) sits outside the
sigmoid, so each draw is its own logistic term (averaging sigmoids over draws over-tilts, PREFERENCES.md 10.3);
(ii) the Gaussian single-step likelihood is a modelling choice, not the chain likelihood of the sampler; and
(iii) the latents come from the current policy's inversion, so the regression target moves with theta: a fixed
point is a theta whose loss is stationary under the latent law it induces itself, with no closed form. Only the
support of the pair file is constrained. The bench measures where it lands.

``beta`` is in the same code units as diffusion-dpo's (a temperature on per-element mean errors): the official
values are 2000 (SD1.5) and 5000 (SDXL), with about 400 steps. For flow schedules (model time 1000 s,
x_s = (1 - s) x_0 + s eps) the same inversion is the deterministic flow-ODE (Euler/DDIM) step run upward, on the
grid g_j = 1000 j / K, and the loss is on the eps error, as in diffusion-dpo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.schedule import ddim_sigma_coeffs
from ..errors import ConfigError
from ..preferences.data import load_pairs
from .base import IterationContext, Method, MethodConfig
from .diffusion_dpo import diffusion_dpo_loss, training_times


@dataclass
class InPOConfig(MethodConfig):
    """Hyperparameters of InPO (official SD1.5: beta 2000, 1024 pairs per step, 400 steps, 10-step inversion
    with eta_inv 0.1)."""

    data: str | None = option(None, "preference file (.jsonl or .parquet: tensors, Pick-a-Pic or HPDv2 layout); "
                              "required")
    lr: float = option(1e-4, "AdamW learning rate")
    beta: float = option(2000.0, "the DPO temperature on per-element mean eps errors, in diffusion-dpo's code units "
                         "(official 2000 for SD1.5, 5000 for SDXL; a toy's few elements need a far smaller one)")
    pairs_per_step: int = option(64, "pairs per gradient step (drawn from the file with replacement)")
    inversion_steps: int = option(10, "points of the coarse DDIM-inversion grid 0, N/K, .., (K-1) N/K (official 10)")
    inversion_noise: float = option(0.1, "eta_inv: extra noise after each inverse step, as a fraction of the DDPM "
                                    "posterior std between grid points (official 0.1; 0 = deterministic inversion)")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("method.data is required for inpo: a .jsonl or .parquet preference file "
                              "(see README: preference data; `sqdf pairs TASK --out FILE` writes one)")
        if not self.beta > 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (official 2000 for SD1.5, 5000 for SDXL)")
        if self.pairs_per_step < 1:
            raise ConfigError(f"method.pairs_per_step={self.pairs_per_step} must be >= 1")
        if self.inversion_steps < 1:
            raise ConfigError(f"method.inversion_steps={self.inversion_steps} must be >= 1 grid point (official 10; "
                              "1 means no inversion: the latent is x_0 itself)")
        if not self.inversion_noise >= 0:
            raise ConfigError(f"method.inversion_noise={self.inversion_noise} must be >= 0 (official 0.1; 0 for a "
                              "deterministic DDIM inversion)")


def inversion_grid(schedule, steps: int) -> torch.Tensor:
    """The K = ``steps`` model times of the inversion grid, ascending from 0: floor(j N / K) (long) for a VP
    schedule with N training steps, 1000 j / K (float64) for a flow schedule."""
    if steps < 1:
        raise ConfigError(f"method.inversion_steps={steps} must be >= 1")
    j = torch.arange(steps, dtype=torch.long)
    if hasattr(schedule, "alphas_cumprod"):
        n = len(schedule.alphas_cumprod)
        if steps > n:
            raise ConfigError(f"method.inversion_steps={steps} exceeds the schedule's {n} training steps; use at "
                              f"most {n}")
        return (j * n) // steps
    return j.to(torch.float64) * (1000.0 / steps)


def _coefficients(schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) at model times t [B], each [B, 1, ..., 1] in like's dtype and device."""
    signal, noise = schedule.coefficients_at(t)
    shape = (-1, *([1] * (like.ndim - 1)))
    return signal.to(like.device, like.dtype).view(shape), noise.to(like.device, like.dtype).view(shape)


@torch.no_grad()
def ddim_invert(policy, x0: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, grid: torch.Tensor,
                noise_scale: float = 0.0, generator: torch.Generator | None = None,
                which: str = "policy") -> torch.Tensor:
    """DDIM inversion of samples x0 [B, *shape] by the chosen network, each up the ascending grid (model times,
    grid[0] = 0, where x0 starts) to the largest grid time <= its t [B]:
    x <- signal(g') x0_hat(x, g) + noise(g') eps_hat(x, g) + noise_scale * std(g, g') * z, std the DDPM posterior
    std of x_g given x_{g'} and x_0 (z from ``generator``, drawn for the whole batch at every grid step). Returns
    the inverted latents [B, *shape]; no gradient."""
    grid = grid.to(t.device)
    levels = (grid[None, :] <= t[:, None]).sum(1) - 1  # index of the largest grid time <= t (grid[0] = 0 <= t)
    x = x0.clone()
    for j in range(int(levels.max()) if len(levels) else 0):
        active = (levels > j).nonzero().squeeze(1)
        xa = x[active]
        ca = None if cond is None else cond[active]
        g, g_next = grid[j].expand(len(active)), grid[j + 1].expand(len(active))
        eps_hat, x0_hat = policy.predict_at(xa, g, ca, which)
        s1, n1 = _coefficients(policy.schedule, g_next, xa)
        x_next = s1 * x0_hat + n1 * eps_hat
        if noise_scale > 0:
            s0, n0 = _coefficients(policy.schedule, g, xa)
            std = ddim_sigma_coeffs(s1, n1, s0, n0, 1.0).to(xa.dtype)  # posterior std of x_g given x_{g'}, x_0
            dev = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)[active]
            x_next = x_next + noise_scale * std * z
        x = x.index_copy(0, active, x_next.to(x.dtype))
    return x


def back_solved_noise(schedule, x0: torch.Tensor, x_inv: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps with x_inv = signal_t x0 + noise_t eps: (x_inv - signal_t x0) / noise_t, [B, *shape]."""
    signal, noise = _coefficients(schedule, t, x0)
    return (x_inv - signal * x0) / noise


class InPO(Method):
    name = "inpo"
    config_class = InPOConfig
    offline = True

    def __init__(self, config: InPOConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.grid = inversion_grid(policy.schedule, config.inversion_steps)
        pairs = load_pairs(config.data, policy.sample_shape)
        self.winners, self.losers, self.cond = pairs.winners_first()
        if len(self.winners) == 0:
            raise ConfigError(f"preference file {config.data!r} has no decided pair (every label is a tie 0.5)")

    def inverted_targets(self, x0: torch.Tensor, t: torch.Tensor, cond, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_inv, eps) [B, *shape]: the current policy's DDIM inversion of x0 toward t, and its back-solved noise."""
        x_inv = ddim_invert(self.policy, x0, t, cond, self.grid, self.config.inversion_noise, generator, "policy")
        return x_inv, back_solved_noise(self.policy.schedule, x0, x_inv, t)

    def _errors(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond, which: str) -> torch.Tensor:
        eps_hat, _ = self.policy.predict_at(x_t, t, cond, which)
        return ((eps_hat - eps) ** 2).flatten(1).mean(1)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg, g = self.config, ctx.generator
        n = cfg.pairs_per_step
        device = next(iter(self.policy.trainable_parameters())).device
        idx = torch.randint(0, len(self.winners), (n,), generator=g, device=g.device).cpu()
        w, lo = self.winners[idx].to(device), self.losers[idx].to(device)
        cond = None if self.cond is None else self.cond[idx].to(device)
        t = training_times(self.policy.schedule, n, g).to(device)  # one t per pair, shared by winner and loser
        both, t2 = torch.cat([w, lo]), torch.cat([t, t])
        cond2 = None if cond is None else torch.cat([cond, cond])
        x_inv, eps = self.inverted_targets(both, t2, cond2, g)  # each sample its own inversion
        with torch.no_grad():
            ref = self._errors(x_inv, t2, eps, cond2, "reference")
        self.policy.train()
        err = self._errors(x_inv, t2, eps, cond2, "policy")
        loss, logits = diffusion_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], cfg.beta)
        stats = ctx.optimizer_step(loss)
        return {"loss": float(loss.detach()), "implicit_accuracy": float((logits.detach() > 0).float().mean()),
                "grad_norm": stats["grad_norm"], "target_eps_rms": float(eps.pow(2).mean().sqrt())}
