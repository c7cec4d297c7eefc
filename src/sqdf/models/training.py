"""Train a small denoiser on samples by the standard epsilon-matching loss (for 'mlp' base models)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..diffusion.schedule import NoiseSchedule


def train_denoiser(
    model: nn.Module,
    sample_data: Callable[[int, torch.Generator], torch.Tensor],
    schedule: NoiseSchedule,
    steps: int = 4000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit ``model`` (epsilon prediction) on data from ``sample_data(n, generator) -> [n, *shape]``.

    Loss: E_{t ~ U{0..N-1}, eps} || eps - model(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t) ||^2 (mean over dims).
    Returns the loss curve (one value per step). Uses cosine learning-rate decay.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    abar = schedule.alphas_cumprod.to(torch.float32)
    n_train = abar.shape[0]
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="training base denoiser")
    model.train()
    for _ in iterator:
        x0 = sample_data(batch_size, g).to(torch.float32)
        t = torch.randint(0, n_train, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, *([1] * (x0.ndim - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = ((model(xt, t) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.eval()
    return losses
