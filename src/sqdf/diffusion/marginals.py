"""How far a sampler's final marginal is from the data's: closed forms for Gaussian data with the exact denoiser.

For data x_0 ~ N(0, c I) the exact denoiser is linear, x0_hat(x) = signal c / (signal^2 c + noise^2) x at a state
x = signal x_0 + noise eps, so every step of a sampler is x' = A_k x + sigma_k z and the state's variance follows
v' = A_k^2 v + sigma_k^2 exactly. Comparing v at the end of the grid with the true marginal signal_T^2 c + noise_T^2
measures the discretization error of the step itself (no network error), for the VP DDIM/DDPM step and the flow
steps alike: both are ``x' = signal_{k+1} x0_hat + eps_coef_k eps_hat + sigma_k z``.
"""

from __future__ import annotations

import torch


def step_coefficients(schedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 coefficient [T], eps coefficient [T], std [T]) of each step of ``schedule``, float64: the schedule's own
    ``eps_coefs`` where it has them, else DDIM's sqrt(noise_{k+1}^2 - sigma_k^2)."""
    sigmas = torch.as_tensor(schedule.sigmas, dtype=torch.float64)
    noise = torch.as_tensor(schedule.noise, dtype=torch.float64)
    eps = getattr(schedule, "eps_coefs", None)
    if eps is None:
        eps = (noise[1:] ** 2 - sigmas**2).clamp(min=0).sqrt()
    return torch.as_tensor(schedule.signal, dtype=torch.float64)[1:], torch.as_tensor(eps, dtype=torch.float64), sigmas


def gaussian_marginal_variances(schedule, data_var: float = 1.0, start_var: float = 1.0) -> torch.Tensor:
    """Per-dimension variance of the sampler's state at every grid index, [T + 1] float64, for data N(0, data_var I)
    and the exact denoiser; the chain starts from N(0, start_var I) (the policy's initial noise: 1)."""
    signal = torch.as_tensor(schedule.signal, dtype=torch.float64)
    noise = torch.as_tensor(schedule.noise, dtype=torch.float64)
    x0_coef, eps_coef, sigmas = step_coefficients(schedule)
    v = [torch.tensor(float(start_var), dtype=torch.float64)]
    for k in range(len(sigmas)):
        gain = signal[k] * data_var / (signal[k] ** 2 * data_var + noise[k] ** 2)  # x0_hat = gain * x
        a = x0_coef[k] * gain + eps_coef[k] * (1 - signal[k] * gain) / noise[k]
        v.append(a**2 * v[-1] + sigmas[k] ** 2)
    return torch.stack(v)


def gaussian_marginal_error(schedule, data_var: float = 1.0) -> float:
    """Relative error of the final variance, v_T / (signal_T^2 c + noise_T^2) - 1 (negative: too little variance)."""
    signal_end, noise_end = float(schedule.signal[-1]), float(schedule.noise[-1])
    target = signal_end**2 * data_var + noise_end**2
    return float(gaussian_marginal_variances(schedule, data_var)[-1]) / target - 1
