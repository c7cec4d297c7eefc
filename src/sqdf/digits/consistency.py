"""Consistency models for the digits base model: f(x_t, t, c) -> x_0 in one network call.

Parameterization: f(x, t, c) = (x - sqrt(1 - a) eps_net(x, t, c)) / sqrt(a) with a = max(abar_t, abar_floor) for
t > 0, and f(x, 0, c) = x (the boundary condition). Below the floor this is the teacher's Tweedie estimate, so a
network initialized from the teacher starts there; the floor (default 0.01) keeps the division by sqrt(a) from
amplifying the network's output 600-fold at the last timesteps of the cosine schedule (any f is still reachable).
Consistency distillation (Song et al. 2023) trains it so that f(x_t, t) = f_ema(x_s, s) where x_s is one
deterministic DDIM (probability-flow) step of the guided teacher from t to s = max(t - skip, 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.schedule import NoiseSchedule, ScheduleConfig


class ConsistencyModel(nn.Module):
    """Wraps an epsilon-network into the consistency function f(x, t, c) -> x0 [B, *shape]."""

    def __init__(self, net: nn.Module, num_train_steps: int = 1000, schedule: str = "cosine",
                 abar_floor: float = 0.01):
        super().__init__()
        self.net = net
        self.schedule_kind = schedule
        self.abar_floor = float(abar_floor)
        abar = NoiseSchedule(ScheduleConfig(kind=schedule, num_train_steps=num_train_steps), 1).alphas_cumprod
        self.register_buffer("alphas_cumprod", abar.to(torch.float32), persistent=False)

    def arch(self) -> dict:
        return {"net": self.net.arch(), "num_train_steps": int(self.alphas_cumprod.shape[0]),
                "schedule": self.schedule_kind, "abar_floor": self.abar_floor}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a = self.alphas_cumprod.to(x.device, x.dtype)[t.long()].clamp(min=self.abar_floor)
        a = a.view(-1, *([1] * (x.ndim - 1)))
        x0 = (x - (1 - a).sqrt() * self.net(x, t, cond)) / a.sqrt()
        boundary = (t == 0).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(boundary, x, x0)


def ddim_ode_step(eps: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor,
                  clip: float | None = None) -> torch.Tensor:
    """Deterministic DDIM step from level abar_t to abar_s given eps(x): sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat.
    With ``clip``, x0_hat is clamped to [-clip, clip] and eps_hat recomputed from it (the sampler's clip_sample)."""
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps
