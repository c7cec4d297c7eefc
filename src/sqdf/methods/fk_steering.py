"""Feynman-Kac steering (Singhal et al. 2025): particles resampled by potentials of intermediate rewards.

For each output sample, k particles run the (untrained) policy's sampler. Every ``resample_every`` steps each
particle's clean sample is estimated (Tweedie, x0_hat of the policy at the new state) and scored, r_j, and the
particles of a group are resampled (multinomially) with weights exp(lambda * potential):

- ``difference``: r_j - r_{j-1} (r_0 = 0). The product over resamplings telescopes to exp(lambda r(x_0)), so
  with lambda = 1/alpha the particle system targets p_ref exp(r / alpha), the optimum of the objective.
- ``max``: max over i <= j of r_i.     - ``sum``: sum over i <= j of r_i.

At the end the final samples are scored and one particle per group is kept: drawn by the final potential
(``select='sample'``) or the highest reward (``select='argmax'``). Every score is a reward query: k times
(number of resamplings + 1) per output sample. The law of the output has no per-path KL that can be computed, so
``path_kl`` is not reported; the x0 KL estimate of the evaluation applies to it as to every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import ConfigError
from .base import Generated, InferenceMethod, MethodConfig

POTENTIALS = ("difference", "max", "sum")
SELECTIONS = ("sample", "argmax")


@dataclass
class FKSteeringConfig(MethodConfig):
    """FK steering (no training: the MethodConfig fields are unused)."""

    particles: int = option(8, "particles per output sample (k)")
    potential: str = option("difference", f"potential over intermediate rewards: one of {POTENTIALS}")
    lam: float | None = option(None, "inverse temperature lambda of the potentials; None: 1 / task alpha")
    resample_every: int = option(10, "sampler steps between resamplings")
    select: str = option("sample", f"how the output particle is chosen: one of {SELECTIONS}")

    def validate(self) -> None:
        super().validate()
        if self.particles < 1:
            raise ConfigError(f"method.particles={self.particles} must be >= 1")
        if self.potential not in POTENTIALS:
            raise ConfigError(f"method.potential={self.potential!r} must be one of {POTENTIALS}")
        if self.lam is not None and not self.lam > 0:
            raise ConfigError(f"method.lam={self.lam} must be > 0 (or None for 1 / alpha)")
        if self.resample_every < 1:
            raise ConfigError(f"method.resample_every={self.resample_every} must be >= 1")
        if self.select not in SELECTIONS:
            raise ConfigError(f"method.select={self.select!r} must be one of {SELECTIONS}")


def potential_log_weights(kind: str, rewards: torch.Tensor, previous: torch.Tensor, lam: float) -> tuple:
    """(log weights [P], new running statistic [P]) from the rewards r_j [P] and the running statistic of the
    previous resamplings (difference: r_{j-1}; max: max_i r_i; sum: sum_i r_i; start: 0, -inf, 0)."""
    if kind == "difference":
        return lam * (rewards - previous), rewards
    if kind == "max":
        running = torch.maximum(previous, rewards)
        return lam * running, running
    if kind == "sum":
        running = previous + rewards
        return lam * running, running
    raise ValueError(f"unknown potential {kind!r}; use one of {POTENTIALS}")


def initial_statistic(kind: str, n: int, device, dtype) -> torch.Tensor:
    fill = float("-inf") if kind == "max" else 0.0
    return torch.full((n,), fill, device=device, dtype=dtype)


def resample_indices(log_weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Multinomial resampling inside consecutive groups of k: log_weights [G * k] -> flat ancestor indices [G*k]."""
    probs = torch.softmax(log_weights.view(-1, k).to(torch.float64), dim=1)
    idx = torch.multinomial(probs.to(generator.device), k, replacement=True, generator=generator)
    return (idx.to(log_weights.device) + torch.arange(probs.shape[0], device=log_weights.device)[:, None] * k).view(-1)


class FKSteering(InferenceMethod):
    name = "fk_steering"
    config_class = FKSteeringConfig

    def __init__(self, config: FKSteeringConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        self.lam = 1.0 / alpha if config.lam is None else config.lam

    @torch.no_grad()
    def generate(self, n: int, cond, generator: torch.Generator, reward) -> Generated:
        cfg, policy = self.config, self.policy
        k, T = cfg.particles, policy.num_steps
        P = n * k
        cond = None if cond is None else cond.repeat_interleave(k, dim=0)
        x = policy.initial_noise(P, generator)
        stat = initial_statistic(cfg.potential, P, x.device, torch.float64)
        for step in range(T):
            mean = policy.step_mean(x, step, cond)
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            sigma = policy.sigma(step)
            x = mean + sigma * noise if sigma > 0 else mean
            if step + 1 < T and (step + 1) % cfg.resample_every == 0:
                x0_hat = policy.predict(x, step + 1, cond)[1]
                r = reward(x0_hat, cond).to(torch.float64)
                log_w, stat = potential_log_weights(cfg.potential, r, stat, self.lam)
                anc = resample_indices(log_w, k, generator)
                x, stat = x[anc], stat[anc]
                cond = None if cond is None else cond[anc]
        r = reward(x, cond).to(torch.float64)
        log_w, _ = potential_log_weights(cfg.potential, r, stat, self.lam)
        if cfg.select == "argmax":
            pick = r.view(-1, k).argmax(1) + torch.arange(n, device=x.device) * k
        else:
            pick = resample_indices(log_w, k, generator).view(n, k)[:, 0]
        return Generated(x[pick], None, "none: FK steering's output law has no computable path KL (see x0_kl)")
