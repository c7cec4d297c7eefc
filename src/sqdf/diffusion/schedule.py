"""Variance-preserving noise schedules and DDIM step math, as pure functions.

Conventions. A VP forward process has ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for training timesteps
``t = 0 .. N-1``. Sampling runs over a descending list of ``T + 1`` timesteps ``t_0 > t_1 > ... > t_T``: the chain
starts at ``x_{t_0} ~ N(0, I)`` and step ``k`` (``k = 0 .. T-1``) maps ``x_{t_k}`` to ``x_{t_{k+1}}``; the final state
``x_{t_T}`` is the sample. Every step has a Gaussian transition
``N(mean_k, sigma_k^2 I)`` with ``sigma_k > 0`` whenever ``eta > 0``.
All functions broadcast over leading batch dimensions; ``abar`` values are tensors or floats in (0, 1].

Beyond VP, every schedule is described by two coefficients per grid point, ``x_t = signal_t x_0 + noise_t eps``:
VP has ``signal = sqrt(abar)``, ``noise = sqrt(1 - abar)``; rectified flow (SD3 / FLUX) has ``signal = 1 - s``,
``noise = s`` for the flow time ``s`` in (0, 1]. The DDIM step written with these coefficients is the same
Gaussian step for both, so one policy serves them all (for flow it is the coefficient-preserving stochastic
sampler: the deterministic flow ODE step plus fresh noise whose variance the mean's noise term gives back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def linear_betas(num_train_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear betas, shape [num_train_steps], float64."""
    return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)


def cosine_betas(num_train_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule: abar(t) = cos^2(((t/N) + s) / (1 + s) * pi/2), betas clipped at max_beta."""
    steps = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def scaled_linear_betas(num_train_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's 'scaled_linear' betas: linspace(sqrt(beta_start), sqrt(beta_end))^2, float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2


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
    elif prediction_type == "flow":
        raise ConfigError("prediction_type='flow' needs a flow schedule's coefficients; use prediction_to_eps_and_x0")
    else:
        raise ConfigError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    return eps, x0


def prediction_to_eps_and_x0(
    prediction: torch.Tensor, x_t: torch.Tensor, signal, noise, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from a network output at a state ``x_t = signal x0 + noise eps`` (any schedule).

    flow (velocity v = eps - x0): x0 = (x - noise v) / (signal + noise), eps = x0 + v. The VP types need a VP
    state (signal^2 + noise^2 = 1) and go through ``to_eps_and_x0``.
    """
    sig = torch.as_tensor(signal, dtype=x_t.dtype, device=x_t.device)
    noi = torch.as_tensor(noise, dtype=x_t.dtype, device=x_t.device)
    if prediction_type == "flow":
        x0 = (x_t - noi * prediction) / (sig + noi)
        return x0 + prediction, x0
    return to_eps_and_x0(prediction, x_t, sig**2, prediction_type)


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


def ddim_sigma_coeffs(signal, noise, signal_next, noise_next, eta: float) -> torch.Tensor:
    """DDIM step std for any schedule: eta * noise' * sqrt(1 - (signal noise')^2 / (signal' noise)^2), the posterior
    std of x' given (x, x0) times eta. Equals ``ddim_sigma`` for VP coefficients."""
    s, n = torch.as_tensor(signal, dtype=torch.float64), torch.as_tensor(noise, dtype=torch.float64)
    s1, n1 = torch.as_tensor(signal_next, dtype=torch.float64), torch.as_tensor(noise_next, dtype=torch.float64)
    ratio = (s * n1) / (s1 * n)
    return eta * n1 * (1 - ratio**2).clamp(min=0).sqrt()


def _per_sample(std: torch.Tensor | float, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or per-sample std ([B] or [B, 1, ...]) as a [B] tensor on ref's device, in ``dtype`` (None: ref's)."""
    s = torch.as_tensor(std, dtype=dtype or ref.dtype, device=ref.device)
    if s.ndim == 0:
        return s.expand(ref.shape[0])
    return s.reshape(ref.shape[0], -1)[:, 0]


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype sums over a sample's dimensions are taken in: float64 (MPS, which has none: float32).

    A log-density summed over d = 16,384 latent dimensions (SD1.5 at 512 px) is ~5e4 in size, where float32's spacing
    is 4e-3 to 8e-3: re-scoring the same transition in another batch layout (another summation order) moves a float32
    sum by more than the 1e-4 ratios PPO clips. In float64 the same sum is exact to ~1e-11."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I), summed over all non-batch dims. x, mean [B, ...]; std scalar or per-sample;
    -> [B] in ``accumulation_dtype`` (float64: the difference x - mean of float32 inputs is exact there)."""
    acc = accumulation_dtype(x)
    s = _per_sample(std, x, acc)
    d = x[0].numel()
    sq = ((x.to(acc) - mean.to(acc)) ** 2).flatten(1).sum(1)
    return -0.5 * sq / s**2 - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor | float, mean_q: torch.Tensor, std_q: torch.Tensor | float
) -> torch.Tensor:
    """Exact KL(N(mean_p, std_p^2 I) || N(mean_q, std_q^2 I)), summed over non-batch dims; returns [B].

    KL = sum_i [ log(std_q/std_p) + (std_p^2 + (mp_i - mq_i)^2) / (2 std_q^2) - 1/2 ].
    With std_p == std_q this is ||mean_p - mean_q||^2 / (2 std^2). Stds are scalars or per-sample. Summed in
    ``accumulation_dtype`` (float64), the dtype of the result.
    """
    acc = accumulation_dtype(mean_p)
    sp = _per_sample(std_p, mean_p, acc)
    sq = _per_sample(std_q, mean_p, acc)
    d = mean_p[0].numel()
    diff2 = ((mean_p.to(acc) - mean_q.to(acc)) ** 2).flatten(1).sum(1)
    return d * (torch.log(sq / sp) + sp**2 / (2 * sq**2) - 0.5) + diff2 / (2 * sq**2)


@dataclass(frozen=True)
class ScheduleConfig:
    """How the VP schedule and the sampler's timestep grid are built."""

    kind: str = "linear"  # "linear", "cosine" or "scaled_linear" (Stable Diffusion: beta 0.00085 .. 0.012)
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def validate(self) -> None:
        if self.kind not in ("linear", "cosine", "scaled_linear"):
            raise ConfigError(f"schedule kind={self.kind!r} must be 'linear', 'cosine' or 'scaled_linear'")
        if self.num_train_steps < 2:
            raise ConfigError(f"num_train_steps={self.num_train_steps} must be >= 2")
        if self.kind != "cosine" and not (0 < self.beta_start < self.beta_end < 1):
            raise ConfigError(f"need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1")


CLIP_SAMPLE_MODES = ("ddpm", "ddim")


class NoiseSchedule:
    """A VP schedule (abar over training timesteps) plus an inference grid and DDIM eta.

    Holds float64 tensors: ``alphas_cumprod`` [N]; ``timesteps`` (list of T+1 ints); ``abar`` [T+1] at the grid;
    ``sigmas`` [T] per-step std. ``num_steps`` is T. ``clip_sample`` (None or c > 0): the policy clamps its x0
    predictions to [-c, c], for image data in a range; ``clip_sample_mode`` says which eps goes with the clamped x0:
    ``"ddpm"`` (default) recomputes it from the clamped x0, eps = (x - signal x0) / noise, so the step is DDPM's
    posterior mean at the clamped x0 (diffusers' ``DDPMScheduler``); ``"ddim"`` keeps the network's eps, as
    diffusers' ``DDIMScheduler`` does with ``clip_sample=True``. The two agree where no clamp applies.
    """

    def __init__(
        self,
        config: ScheduleConfig = ScheduleConfig(),
        num_inference_steps: int = 20,
        eta: float = 1.0,
        timesteps: list[int] | None = None,
        clip_sample: float | None = None,
        clip_sample_mode: str = "ddpm",
    ):
        config.validate()
        if clip_sample is not None and not clip_sample > 0:
            raise ConfigError(f"clip_sample={clip_sample} must be > 0 (or None for no clipping)")
        if clip_sample_mode not in CLIP_SAMPLE_MODES:
            raise ConfigError(f"clip_sample_mode={clip_sample_mode!r} must be one of {CLIP_SAMPLE_MODES} ('ddpm': "
                              "eps recomputed from the clamped x0; 'ddim': the network's eps, diffusers' DDIM)")
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.clip_sample_mode = clip_sample_mode
        if not (0.0 <= eta <= 1.0):
            raise ConfigError(f"eta={eta} must be in [0, 1] (1 = DDPM posterior variance, 0 = deterministic DDIM)")
        self.config = config
        self.eta = float(eta)
        if config.kind == "linear":
            betas = linear_betas(config.num_train_steps, config.beta_start, config.beta_end)
        elif config.kind == "scaled_linear":
            betas = scaled_linear_betas(config.num_train_steps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.num_train_steps)
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        if timesteps is None:
            self.timesteps = spaced_timesteps(config.num_train_steps, num_inference_steps)
        else:
            self.timesteps = validate_timesteps(timesteps, config.num_train_steps)
        self.abar = self.alphas_cumprod[self.timesteps]
        self.signal, self.noise = self.abar.sqrt(), (1 - self.abar).sqrt()
        self.sigmas = ddim_sigma(self.abar[:-1], self.abar[1:], self.eta)
        self.eps_coefs = (self.noise[1:] ** 2 - self.sigmas**2).clamp(min=0).sqrt()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def abar_at_train_step(self, t: torch.Tensor) -> torch.Tensor:
        """abar for integer training timesteps t (any shape), float64."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def coefficients_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) at model timesteps t (any shape; rounded to training steps), float64."""
        a = self.alphas_cumprod.to(t.device)[torch.round(t.to(torch.float64)).long()]
        return a.sqrt(), (1 - a).sqrt()

    def subgrid(self, t_start: torch.Tensor, fraction: float) -> torch.Tensor:
        """The model timestep a ``fraction`` of the way from t_start [B] down to the data end (0), for ODE solves."""
        return torch.round(t_start.to(torch.float64) * (1 - fraction))


def flow_sde_coeffs(s: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [T], eps_coefs [T]) of Flow-GRPO's SDE step on the flow-time grid s [T + 1] (float64), in the form
    x' = (1 - s') x0_hat + eps_coef eps_hat + sigma z: its Euler-Maruyama step x' = x - [v + sigma_t^2 / (2 s)
    (x + (1 - s) v)] (s - s') + sigma_t sqrt(s - s') z, sigma_t = a sqrt(s / (1 - s)), rewritten with
    x = (1 - s) x0 + s eps and v = eps - x0 (the x0 coefficient is exactly 1 - s')."""
    s0, s1 = s[:-1], s[1:]
    one_minus = torch.where(s0 >= 1, (1 - s1[0]).expand_as(s0), 1 - s0)
    var = noise_level**2 * s0 / one_minus * (s0 - s1)
    return var.sqrt(), s1 - var / (2 * s0)


def shift_flow_time(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift s' = shift s / (1 + (shift - 1) s): more steps at high noise for shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


FLOW_STEPS = ("sde", "ddim")


class FlowMatchSchedule:
    """A rectified-flow schedule (SD3 / FLUX): ``x_s = (1 - s) x_0 + s eps``, s from 1 (noise) to ``s_min``.

    The grid is T + 1 evenly spaced flow times from 1 to ``1 / num_train_steps``, then time-shifted by ``shift``, so
    the grid ends at s_min = shift / (num_train_steps + shift - 1) (0.003 for shift 3 and 1000 steps, not 1/1000);
    the model sees timesteps ``1000 s`` (floats). Same attributes as ``NoiseSchedule``: ``timesteps`` (list of T + 1
    floats), ``signal``/``noise``/``abar`` [T + 1] (abar = signal^2 / (signal^2 + noise^2), the VP-equivalent
    level), ``sigmas`` [T] per-step stds and ``eps_coefs`` [T]: every step is
    x' = (1 - s') x0_hat + eps_coef eps_hat + sigma z, stochastic everywhere since s_min > 0.

    ``step`` picks the coefficients (both first order: the final marginal is off by O(1/T), see
    ``sqdf.diffusion.marginals``):
    - ``"sde"`` (default): Flow-GRPO's Euler-Maruyama step of the marginal-preserving reverse SDE with noise level
      a = ``eta``: sigma^2 = a^2 s (s - s') / (1 - s) (1 - s at s = 1 taken at the next grid time, as Flow-GRPO does)
      and eps_coef = s' - sigma^2 / (2 s). With the exact velocity on Gaussian data it keeps 3.4 times more of the
      marginal's variance than DDIM at 28 steps (final-variance error -6.9% at a = 0.7 against DDIM's -23%).
    - ``"ddim"``: the DDIM step with eta in [0, 1] (sigma = eta times the posterior std given x0_hat, eps_coef =
      sqrt(s'^2 - sigma^2)); eta = 0 is the deterministic flow ODE (diffusers' Euler step), -12% at 28 steps.
    """

    clip_sample = None

    def __init__(self, num_inference_steps: int = 28, eta: float = 0.7, shift: float = 3.0,
                 num_train_steps: int = 1000, step: str = "sde"):
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps={num_inference_steps} must be >= 1")
        if step not in FLOW_STEPS:
            raise ConfigError(f"flow step={step!r} must be one of {FLOW_STEPS} ('sde': Flow-GRPO's step)")
        if step == "ddim" and not (0.0 <= eta <= 1.0):
            raise ConfigError(f"eta={eta} must be in [0, 1] for the DDIM flow step (1 = posterior variance, 0 = "
                              "deterministic flow ODE)")
        if step == "sde" and not eta > 0:
            raise ConfigError(f"eta={eta} is the SDE step's noise level and must be > 0 (Flow-GRPO uses 0.7); for a "
                              "deterministic sampler use the 'ddim' flow step with eta 0")
        if not shift > 0:
            raise ConfigError(f"flow shift={shift} must be > 0 (SD3 uses 3.0; 1.0 is no shift)")
        self.eta, self.shift, self.num_train_steps, self.step = float(eta), float(shift), int(num_train_steps), step
        s = shift_flow_time(torch.linspace(1.0, 1.0 / num_train_steps, num_inference_steps + 1,
                                           dtype=torch.float64), shift)
        self.flow_times = s
        self.timesteps = [float(v) for v in (s * 1000).tolist()]
        self.signal, self.noise = 1 - s, s
        self.abar = self.signal**2 / (self.signal**2 + self.noise**2)
        if step == "ddim":
            self.sigmas = ddim_sigma_coeffs(self.signal[:-1], self.noise[:-1], self.signal[1:], self.noise[1:],
                                            self.eta)
            self.eps_coefs = (s[1:] ** 2 - self.sigmas**2).clamp(min=0).sqrt()
        else:
            self.sigmas, self.eps_coefs = flow_sde_coeffs(s, self.eta)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def coefficients_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) = (1 - t/1000, t/1000) at model timesteps t (any shape), float64."""
        s = t.to(torch.float64) / 1000
        return 1 - s, s

    def subgrid(self, t_start: torch.Tensor, fraction: float) -> torch.Tensor:
        return t_start.to(torch.float64) * (1 - fraction)
