"""Variance-preserving noise schedules and DDIM step math, as pure functions.

Conventions. A VP forward process has ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for training timesteps
``t = 0 .. N-1``. Sampling runs over a descending list of ``T + 1`` timesteps ``t_0 > t_1 > ... > t_T``: the chain
starts at ``x_{t_0} ~ N(0, I)`` and step ``k`` (``k = 0 .. T-1``) maps ``x_{t_k}`` to ``x_{t_{k+1}}``; the final state
``x_{t_T}`` is the sample. Every step has a Gaussian transition
``N(mean_k, sigma_k^2 I)`` with ``sigma_k > 0`` whenever ``eta > 0``.
All functions broadcast over leading batch dimensions; ``abar`` values are tensors or floats in (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def linear_betas(num_train_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear betas, shape [num_train_steps], float64."""
    return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)


def cosine_betas(num_train_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule: abar(t) = cos^2(((t/N) + s) / (1 + s) * pi/2), betas clipped at max_beta."""
    steps = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), shape like betas."""
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(num_train_steps: int, num_inference_steps: int) -> list[int]:
    """T + 1 descending, evenly spaced training timesteps from N-1 down to 0 (both ends included)."""
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps={num_inference_steps} must be >= 1")
    if num_inference_steps >= num_train_steps:
        raise ConfigError(
            f"num_inference_steps={num_inference_steps} must be smaller than num_train_steps={num_train_steps}"
        )
    grid = torch.linspace(num_train_steps - 1, 0, num_inference_steps + 1, dtype=torch.float64)
    steps = [int(round(v)) for v in grid.tolist()]
    return steps


def validate_timesteps(timesteps: list[int], num_train_steps: int) -> list[int]:
    """Check a user-given descending timestep list (length >= 2, strictly decreasing, within [0, N-1])."""
    ts = [int(t) for t in timesteps]
    if len(ts) < 2:
        raise ConfigError(f"timesteps={ts} needs at least 2 entries (a start and an end); pass e.g. [999, 500, 0]")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"timesteps={ts} must be strictly decreasing, e.g. [999, 500, 0]")
    if ts[0] > num_train_steps - 1 or ts[-1] < 0:
        raise ConfigError(f"timesteps={ts} must lie in [0, {num_train_steps - 1}]")
    return ts


def to_eps_and_x0(
    prediction: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor | float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output to (eps_hat, x0_hat) at noise level abar_t.

    epsilon:      x0 = (x - sqrt(1-a) eps) / sqrt(a)
    sample:       eps = (x - sqrt(a) x0) / sqrt(1-a)
    v_prediction: v = sqrt(a) eps - sqrt(1-a) x0  =>  x0 = sqrt(a) x - sqrt(1-a) v,  eps = sqrt(1-a) x + sqrt(a) v
    """
    a = torch.as_tensor(abar_t, dtype=x_t.dtype, device=x_t.device)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = prediction
        x0 = (x_t - s1a * eps) / sa
    elif prediction_type == "sample":
        x0 = prediction
        eps = (x_t - sa * x0) / s1a
    elif prediction_type == "v_prediction":
        x0 = sa * x_t - s1a * prediction
        eps = s1a * x_t + sa * prediction
    else:
        raise ConfigError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    return eps, x0


def tweedie_x0(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor | float) -> torch.Tensor:
    """Tweedie estimate E[x_0 | x_t] = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
    a = torch.as_tensor(abar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()


def ddim_sigma(abar_t: torch.Tensor | float, abar_prev: torch.Tensor | float, eta: float) -> torch.Tensor:
    """DDIM step std: eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev). eta=1 is the DDPM posterior std."""
    a_t = torch.as_tensor(abar_t, dtype=torch.float64)
    a_p = torch.as_tensor(abar_prev, dtype=torch.float64)
    return eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp(min=0).sqrt()


def ddim_mean(
    x0_hat: torch.Tensor, eps_hat: torch.Tensor, abar_prev: torch.Tensor | float, sigma: torch.Tensor | float
) -> torch.Tensor:
    """DDIM step mean: sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat."""
    a_p = torch.as_tensor(abar_prev, dtype=x0_hat.dtype, device=x0_hat.device)
    s = torch.as_tensor(sigma, dtype=x0_hat.dtype, device=x0_hat.device)
    return a_p.sqrt() * x0_hat + (1 - a_p - s**2).clamp(min=0).sqrt() * eps_hat


def _per_sample(std: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample std ([B] or [B, 1, ...]) as a [B] tensor in ref's dtype/device."""
    s = torch.as_tensor(std, dtype=ref.dtype, device=ref.device)
    if s.ndim == 0:
        return s.expand(ref.shape[0])
    return s.reshape(ref.shape[0], -1)[:, 0]


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I), summed over all non-batch dims. x, mean [B, ...]; std scalar or per-sample; -> [B]."""
    s = _per_sample(std, x)
    d = x[0].numel()
    sq = ((x - mean) ** 2).flatten(1).sum(1)
    return -0.5 * sq / s**2 - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor | float, mean_q: torch.Tensor, std_q: torch.Tensor | float
) -> torch.Tensor:
    """Exact KL(N(mean_p, std_p^2 I) || N(mean_q, std_q^2 I)), summed over non-batch dims; returns [B].

    KL = sum_i [ log(std_q/std_p) + (std_p^2 + (mp_i - mq_i)^2) / (2 std_q^2) - 1/2 ].
    With std_p == std_q this is ||mean_p - mean_q||^2 / (2 std^2). Stds are scalars or per-sample.
    """
    sp = _per_sample(std_p, mean_p)
    sq = _per_sample(std_q, mean_p)
    d = mean_p[0].numel()
    diff2 = ((mean_p - mean_q) ** 2).flatten(1).sum(1)
    return d * (torch.log(sq / sp) + sp**2 / (2 * sq**2) - 0.5) + diff2 / (2 * sq**2)


@dataclass(frozen=True)
class ScheduleConfig:
    """How the VP schedule and the sampler's timestep grid are built."""

    kind: str = "linear"  # "linear" or "cosine"
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def validate(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ConfigError(f"schedule kind={self.kind!r} must be 'linear' or 'cosine'")
        if self.num_train_steps < 2:
            raise ConfigError(f"num_train_steps={self.num_train_steps} must be >= 2")
        if not (0 < self.beta_start < self.beta_end < 1):
            raise ConfigError(f"need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1")


class NoiseSchedule:
    """A VP schedule (abar over training timesteps) plus an inference grid and DDIM eta.

    Holds float64 tensors: ``alphas_cumprod`` [N]; ``timesteps`` (list of T+1 ints); ``abar`` [T+1] at the grid;
    ``sigmas`` [T] per-step std. ``num_steps`` is T. ``clip_sample`` (None or c > 0): the policy clamps its x0
    predictions to [-c, c] and recomputes eps from them (diffusers' ``clip_sample``), for image data in a range.
    """

    def __init__(
        self,
        config: ScheduleConfig = ScheduleConfig(),
        num_inference_steps: int = 20,
        eta: float = 1.0,
        timesteps: list[int] | None = None,
        clip_sample: float | None = None,
    ):
        config.validate()
        if clip_sample is not None and not clip_sample > 0:
            raise ConfigError(f"clip_sample={clip_sample} must be > 0 (or None for no clipping)")
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        if not (0.0 <= eta <= 1.0):
            raise ConfigError(f"eta={eta} must be in [0, 1] (1 = DDPM posterior variance, 0 = deterministic DDIM)")
        self.config = config
        self.eta = float(eta)
        if config.kind == "linear":
            betas = linear_betas(config.num_train_steps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.num_train_steps)
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        if timesteps is None:
            self.timesteps = spaced_timesteps(config.num_train_steps, num_inference_steps)
        else:
            self.timesteps = validate_timesteps(timesteps, config.num_train_steps)
        self.abar = self.alphas_cumprod[self.timesteps]
        self.sigmas = ddim_sigma(self.abar[:-1], self.abar[1:], self.eta)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def abar_at_train_step(self, t: torch.Tensor) -> torch.Tensor:
        """abar for integer training timesteps t (any shape), float64."""
        return self.alphas_cumprod.to(t.device)[t.long()]
