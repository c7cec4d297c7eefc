"""Value networks V(x_t, t, cond) -> [B] for policy-gradient baselines."""

from __future__ import annotations

import torch
from torch import nn

from .denoisers import timestep_embedding


def scalar_mlp(width: int, hidden: int, num_layers: int) -> nn.Sequential:
    """[B, width] -> [B, 1]: num_layers SiLU layers of ``hidden`` units, then a linear output."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class ValueMLP(nn.Module):
    """An MLP on [flattened x, emb(t), cond] returning one value per sample [B]."""

    def __init__(self, numel: int, hidden: int = 128, num_layers: int = 2, time_dim: int = 32,
                 num_train_steps: int = 1000, cond_dim: int = 0):
        super().__init__()
        self.time_dim, self.num_train_steps, self.cond_dim = time_dim, num_train_steps, cond_dim
        self.net = scalar_mlp(numel + time_dim + cond_dim, hidden, num_layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feats = [x.flatten(1).float(), timestep_embedding(t, self.time_dim, self.num_train_steps)]
        if self.cond_dim:
            feats.append(cond.float().reshape(x.shape[0], -1))
        return self.net(torch.cat(feats, 1)).squeeze(1)


class SoftCritic(nn.Module):
    """A learned soft value V_phi(x_t, t, cond) -> [B] of the denoising MDP, fit to returns r - alpha sum KL.

    Inputs: the state x [B, *shape] and, when ``x0_input``, a clean-sample estimate x0_hat [B, *shape] of it (the
    frozen reference's, so the critic starts from r's landscape), both divided by ``scale`` (the data's std, set
    once from the first samples seen); a sinusoidal embedding of the model timestep t [B]; and an embedding of an
    integer condition (index mod ``cond_buckets``; float conditions are not read). Vectors ([d]) go through an MLP; images ([C, H, W])
    through a small conv net with global pooling first. The output is ``target_mean + target_std * f(...)``, the
    two statistics set by the caller from the returns it fits (``set_target_stats``), so f stays O(1) whatever the
    reward's scale.
    """

    def __init__(self, sample_shape: tuple[int, ...], hidden: int = 256, num_layers: int = 3, x0_input: bool = True,
                 time_dim: int = 32, num_train_steps: int = 1000, cond_buckets: int = 1024, cond_dim: int = 32):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.x0_input, self.time_dim, self.num_train_steps = x0_input, time_dim, num_train_steps
        self.cond_buckets = cond_buckets
        channels = 2 if x0_input else 1
        if len(self.sample_shape) == 3:
            c = self.sample_shape[0] * channels
            width = min(64, max(16, hidden // 4))
            self.encoder = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten())
            feat = 2 * width * 4
        else:
            self.encoder = nn.Flatten()
            feat = channels * int(torch.tensor(self.sample_shape).prod())
        self.cond_embed = nn.Embedding(cond_buckets, cond_dim)
        self.head = scalar_mlp(feat + time_dim + cond_dim, hidden, num_layers)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("scale_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def set_scale_from(self, samples: torch.Tensor) -> None:
        """Fix the input scale to the std of ``samples`` [B, *shape] (once; later calls keep the first value)."""
        if not bool(self.scale_set):
            self.scale.fill_(float(samples.detach().float().std().clamp(min=1e-3)))
            self.scale_set.fill_(True)

    def set_target_stats(self, mean: float, std: float) -> None:
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(max(float(std), 1e-6))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                x0_hat: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x.float() / self.scale]
        if self.x0_input:
            if x0_hat is None:
                raise ValueError("this critic reads a clean-sample estimate: pass x0_hat")
            parts.append(x0_hat.float() / self.scale)
        z = torch.cat(parts if len(self.sample_shape) == 3 else [p.flatten(1) for p in parts], dim=1)
        feats = [self.encoder(z), timestep_embedding(t.float(), self.time_dim, self.num_train_steps)]
        if cond is not None and not torch.is_floating_point(cond):
            feats.append(self.cond_embed(cond.reshape(x.shape[0], -1)[:, 0].long() % self.cond_buckets))
        else:
            feats.append(torch.zeros(x.shape[0], self.cond_embed.embedding_dim, device=x.device))
        f = self.head(torch.cat(feats, 1)).squeeze(1)
        return self.target_mean + self.target_std * f
