"""Pieces shared by the models fit on a task's feature map (``Task.proxy_features``): the black-box proxy rewards
(``sqdf.blackbox.proxy``) and the reward models learned from preferences (``sqdf.preferences.reward_model``).

* ``feature_matrix``: the features [N, F] of N samples, computed in chunks without gradients, with checks;
* ``standardization``: per-feature mean and std, constant features left unscaled;
* ``EnsembleMLP``: M independent MLP heads (2 SiLU hidden layers of ``hidden``) evaluated in one batched matmul,
  initialized from a caller's ``torch.Generator`` (deterministic, the global RNG left alone);
* ``ridge_inverse``: (ridge*I + Phi^T Phi)^-1 of last-layer features, the linear-bandit confidence matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

FEATURE_CHUNK = 1024  # samples per feature-map call at fit time


def check_features(f, n: int) -> torch.Tensor:
    """``f`` itself when it is a [n, F] tensor, else a ConfigError saying what the feature map returned."""
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != n:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ConfigError(f"the feature map returned {shape} for {n} samples; it must return [B, F]")
    return f


def feature_matrix(feature_map, x: torch.Tensor, cond: torch.Tensor | None, dtype: torch.dtype,
                   chunk: int = FEATURE_CHUNK) -> torch.Tensor:
    """Features [N, F] in ``dtype`` of samples x [N, *shape] (conditions cond [N, ...] or None), without gradients,
    ``chunk`` samples per call; refuses NaN/inf features and a width that contradicts the map's declared ``dim``."""
    n = x.shape[0]
    with torch.no_grad():
        f = torch.cat([check_features(feature_map(x[s:s + chunk], None if cond is None else cond[s:s + chunk]),
                                      min(chunk, n - s)) for s in range(0, n, chunk)]).to(dtype)
    if not torch.isfinite(f).all():
        raise ConfigError("the feature map returned NaN/inf on the fit samples; check the samples and the map")
    dim = getattr(feature_map, "dim", None)
    if dim is not None and f.shape[1] != dim:
        raise ConfigError(f"the feature map declares dim={dim} but returned {f.shape[1]} features; fix its dim")
    return f


def standardization(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], std [F]) of features f [N, F]; a (near-)constant feature gets std 1, so it is only centered."""
    mean, std = f.mean(0), f.std(0, correction=0)
    return mean, torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))


def uniform_init(shape: tuple[int, ...], fan_in: int, dtype, device, gen: torch.Generator) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear's default range) drawn from ``gen`` in float64."""
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return nn.Parameter(w.to(device=device, dtype=dtype))


class EnsembleMLP(nn.Module):
    """M MLP heads in_dim -> hidden -> hidden -> 1 (SiLU), one batched matmul per layer.

    Parameters w1 [M, in, H], b1 [M, 1, H], w2 [M, H, H], b2 [M, 1, H], w3 [M, H, 1], b3 [M, 1, 1], drawn from
    ``gen`` in that order. Inputs z are [M, B, F] (one batch per member) or [B, F] (shared by all members).
    """

    def __init__(self, members: int, in_dim: int, hidden: int, dtype=torch.float32, device=None,
                 gen: torch.Generator | None = None):
        super().__init__()
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        m, h = members, hidden
        self.members, self.in_dim, self.hidden = m, in_dim, h
        self.w1 = uniform_init((m, in_dim, h), in_dim, dtype, device, gen)
        self.b1 = uniform_init((m, 1, h), in_dim, dtype, device, gen)
        self.w2 = uniform_init((m, h, h), h, dtype, device, gen)
        self.b2 = uniform_init((m, 1, h), h, dtype, device, gen)
        self.w3 = uniform_init((m, h, 1), h, dtype, device, gen)
        self.b3 = uniform_init((m, 1, 1), h, dtype, device, gen)

    def _members(self, z: torch.Tensor) -> torch.Tensor:
        return z.unsqueeze(0).expand(self.members, -1, -1) if z.dim() == 2 else z

    def hidden_features(self, z: torch.Tensor) -> torch.Tensor:
        """Each member's last hidden layer [M, B, H]."""
        a = nn.functional.silu(torch.baddbmm(self.b1, self._members(z), self.w1))
        return nn.functional.silu(torch.baddbmm(self.b2, a, self.w2))

    def output(self, phi: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [M, B] from their last hidden layers phi [M, B, H] (linear, with bias)."""
        return torch.baddbmm(self.b3, phi, self.w3).squeeze(-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Outputs [M, B] of every member."""
        return self.output(self.hidden_features(z))


def ridge_inverse(phi: torch.Tensor, ridge: float) -> torch.Tensor:
    """(ridge*I + phi^T phi)^-1 [D, D] in float64 (symmetrized) for features phi [N, D]."""
    phi = phi.to(torch.float64)
    a = ridge * torch.eye(phi.shape[1], dtype=torch.float64, device=phi.device) + phi.T @ phi
    a_inv = torch.cholesky_inverse(torch.linalg.cholesky(a))
    return 0.5 * (a_inv + a_inv.T)
