"""Denoiser networks for vector data.

Every denoiser maps ``(x [B, d], t [B] integer training timesteps, cond [B, ...] or None)`` to a prediction
[B, d] whose meaning is given by its ``prediction_type`` attribute ("epsilon", "v_prediction" or "sample").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion.mixture import GaussianMixture


def timestep_embedding(t: torch.Tensor, dim: int, num_train_steps: int) -> torch.Tensor:
    """Sinusoidal features of t / num_train_steps, [B] -> [B, dim]."""
    half = dim // 2
    s = t.float()[:, None] / num_train_steps
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (math.log(1000.0) / max(half - 1, 1)))
    ang = s * freqs[None] * math.pi
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class MLPDenoiser(nn.Module):
    """A small MLP epsilon-predictor: [x, emb(t), cond] -> eps. ``zero_init`` makes it output 0 at start."""

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        num_layers: int = 3,
        time_dim: int = 32,
        num_train_steps: int = 1000,
        cond_dim: int = 0,
        zero_init: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        self.dim, self.time_dim, self.cond_dim = dim, time_dim, cond_dim
        self.num_train_steps = num_train_steps
        self.prediction_type = prediction_type
        layers: list[nn.Module] = []
        width = dim + time_dim + cond_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feats = [x.flatten(1), timestep_embedding(t, self.time_dim, self.num_train_steps)]
        if self.cond_dim:
            if cond is None:
                raise ValueError("this denoiser was built with cond_dim > 0 and needs a condition tensor")
            feats.append(cond.float().reshape(x.shape[0], -1))
        return self.out(self.body(torch.cat(feats, dim=1))).view_as(x)


class MixtureScoreDenoiser(nn.Module):
    """The exact epsilon of a Gaussian-mixture data distribution under a VP schedule (no trainable parameters).

    eps(x, t) = -sqrt(1 - abar_t) * grad log p_t(x), with p_t the mixture noised to level abar_t, whose
    components are N(sqrt(a) m_k, U_k diag(a lambda_k + 1 - a) U_k^T) for S_k = U_k diag(lambda_k) U_k^T.
    Vectorized over per-sample timesteps; float64 inside, differentiable in x.
    """

    prediction_type = "epsilon"

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        evals, evecs = torch.linalg.eigh(mixture.covs)
        self.register_buffer("means", mixture.means.clone(), persistent=False)
        self.register_buffer("covs", mixture.covs.clone(), persistent=False)
        self.register_buffer("weights", mixture.weights.clone(), persistent=False)
        self.register_buffer("evals", evals, persistent=False)  # [K, d]
        self.register_buffer("evecs", evecs, persistent=False)  # [K, d, d], columns are eigenvectors
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64).clone(), persistent=False)

    def noised_score(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) for x [B, d] at per-sample levels abar [B]; float64 [B, d]."""
        x = x.to(torch.float64)
        a = abar.to(torch.float64)[:, None, None]  # [B, 1, 1]
        diff = x[:, None, :] - a.sqrt() * self.means[None]  # [B, K, d]
        proj = torch.einsum("kji,bkj->bki", self.evecs, diff)  # U^T diff
        var = a * self.evals[None] + (1 - a)  # [B, K, d]
        logp = torch.log(self.weights)[None] - 0.5 * ((proj**2 / var) + torch.log(var)).sum(-1)
        resp = torch.softmax(logp, dim=1)  # [B, K]
        comp_scores = -torch.einsum("kij,bkj->bki", self.evecs, proj / var)  # -S_t^-1 diff
        return (resp[..., None] * comp_scores).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()]
        score = self.noised_score(x.flatten(1), a)
        return (-(1 - a).sqrt()[:, None] * score).to(x.dtype).view_as(x)


class ResidualDenoiser(nn.Module):
    """base(x, t, c) + correction(x, t, c): fine-tunes a frozen base (e.g. an exact score) through a small net.

    The correction starts at zero output, so the policy equals the base at initialization.
    """

    def __init__(self, base: nn.Module, correction: nn.Module):
        super().__init__()
        self.base = base
        self.correction = correction
        self.prediction_type = getattr(base, "prediction_type", "epsilon")
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(x, t, cond) + self.correction(x, t, cond)
