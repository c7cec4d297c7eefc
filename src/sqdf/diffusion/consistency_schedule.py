"""The multi-step consistency sampler as a schedule of Gaussian steps (the policy RLCM fine-tunes).

Grid: descending training timesteps t_0 > t_1 > ... > t_T = 0, where t_T = 0 stands for the clean sample. The chain
starts at x_{t_0} ~ N(0, I) and step k (k = 0 .. T-1) is

    x0 = f(x_{t_k}, t_k);   x_{t_{k+1}} = signal_{k+1} x0 + noise_{k+1} z,   z ~ N(0, I),

with (signal, noise) = (sqrt(abar), sqrt(1 - abar)) of the VP schedule at t_{k+1}, except at the end: signal_T = 1,
noise_T = 0 (the sample is x0 itself). Every step is the Gaussian N(signal_{k+1} f(x_{t_k}), sigma_k^2 I) with
sigma_k = noise_{k+1}; the last step would be deterministic, so it gets the small fixed std ``final_std`` (a policy
gradient needs a density at every step; RLCM does the same), which blurs the sampler's output by N(0, final_std^2 I).

In ``DiffusionPolicy``'s terms a step's mean is signal_{k+1} x0 + sqrt(noise_{k+1}^2 - sigma_k^2) eps: with
sigma_k = noise_{k+1} (and noise_T = 0 < final_std, clamped) the eps term vanishes, so a policy whose model predicts
the sample (prediction_type 'sample', a consistency model) takes exactly the consistency step above.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .schedule import NoiseSchedule, spaced_timesteps, validate_timesteps


def consistency_coefficients(abar_grid: torch.Tensor, final_std: float) -> tuple[torch.Tensor, ...]:
    """(abar, signal, noise [T+1], sigmas [T]) of the consistency sampler on a grid whose VP levels are abar_grid
    [T+1] (its last entry, the clean end, is replaced by 1). sigmas[k] = noise[k+1], sigmas[-1] = final_std. float64."""
    abar = abar_grid.to(torch.float64).clone()
    abar[-1] = 1.0
    signal, noise = abar.sqrt(), (1 - abar).sqrt()
    sigmas = noise[1:].clone()
    sigmas[-1] = float(final_std)
    return abar, signal, noise, sigmas


class ConsistencySchedule(NoiseSchedule):
    """A VP schedule with the consistency sampler's grid and step stds (see the module docstring).

    Same attributes as ``NoiseSchedule`` (``config``, ``alphas_cumprod``, ``clip_sample``, ``timesteps`` (T + 1 ints),
    ``abar``/``signal``/``noise`` [T + 1], ``sigmas`` [T], ``num_steps``, ``coefficients_at``, ``subgrid``), taken from
    ``base``; ``eta`` is None (not a DDIM sampler) and ``final_std`` is the last step's std.

    Args:
        base: the task's VP schedule (its betas, training steps and clip_sample are used; its grid is not).
        num_steps: sampler steps T; the grid is T + 1 evenly spaced training timesteps from N - 1 down to 0.
        final_std: std of the last step (> 0), in data units.
        timesteps: an explicit descending grid ending at 0 instead, e.g. [999, 759, 499, 259, 0].
    """

    def __init__(self, base: NoiseSchedule, num_steps: int = 4, final_std: float = 0.05,
                 timesteps: list[int] | None = None):
        if not hasattr(base, "alphas_cumprod"):
            raise ConfigError(f"the consistency sampler needs a VP (DDPM) schedule; got {type(base).__name__} "
                              "(flow-matching models have no consistency sampler here)")
        if not final_std > 0:
            raise ConfigError(f"final_std={final_std} must be > 0: the last consistency step needs a density "
                              "(try 0.05, in data units)")
        n_train = base.alphas_cumprod.shape[0]
        if timesteps is None:
            timesteps = spaced_timesteps(n_train, num_steps)
        ts = validate_timesteps(timesteps, n_train)
        if ts[-1] != 0:
            raise ConfigError(f"consistency timesteps={ts} must end at 0 (the clean sample), e.g. [999, 500, 0]")
        # every attribute of NoiseSchedule, set here (not through its __init__, which builds a DDIM grid)
        self.config = base.config
        self.eta = None
        self.clip_sample = base.clip_sample
        self.alphas_cumprod = base.alphas_cumprod
        self.final_std = float(final_std)
        self.timesteps = ts
        self.abar, self.signal, self.noise, self.sigmas = consistency_coefficients(self.alphas_cumprod[ts], final_std)
