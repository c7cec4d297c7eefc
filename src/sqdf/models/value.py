"""Value networks V(x_t, t, cond) -> [B] for policy-gradient baselines."""

from __future__ import annotations

import torch
from torch import nn

from .denoisers import timestep_embedding


class ValueMLP(nn.Module):
    """An MLP on [flattened x, emb(t), cond] returning one value per sample [B]."""

    def __init__(self, numel: int, hidden: int = 128, num_layers: int = 2, time_dim: int = 32,
                 num_train_steps: int = 1000, cond_dim: int = 0):
        super().__init__()
        self.time_dim, self.num_train_steps, self.cond_dim = time_dim, num_train_steps, cond_dim
        layers: list[nn.Module] = []
        width = numel + time_dim + cond_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feats = [x.flatten(1).float(), timestep_embedding(t, self.time_dim, self.num_train_steps)]
        if self.cond_dim:
            feats.append(cond.float().reshape(x.shape[0], -1))
        return self.net(torch.cat(feats, 1)).squeeze(1)
