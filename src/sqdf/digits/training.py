"""Training loops for the shipped digits models (used by scripts/train_digits.py; small enough to test).

All loops are deterministic given ``seed`` and return their loss curves. Images are [B, 1, 8, 8] in [-1, 1].
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from .consistency import ConsistencyModel, ddim_ode_step
from .data import DigitsSplit
from .unet import NULL_CLASS, ClassifierFreeGuidance


def _progress(n: int, desc: str, show: bool):
    if not show:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc)


def _batch(split: DigitsSplit, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, split.labels.shape[0], (n,), generator=g)
    return split.images[idx], split.labels[idx]


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def _cosine_lr(opt: torch.optim.Optimizer, steps: int, warmup: int = 100):
    """Linear warm-up over min(warmup, steps // 10) steps, then cosine decay to 0 at ``steps``."""
    warmup = max(1, min(warmup, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with background (-1)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(model: nn.Module, train: DigitsSplit, steps: int = 3000, batch_size: int = 128,
                     lr: float = 2e-3, noise_std: float = 0.2, seed: int = 0, progress: bool = False) -> list[float]:
    """Cross-entropy with +-1 pixel shifts and Gaussian pixel noise (std noise_std, so that rewards computed on
    slightly noisy generated images stay meaningful)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = _cosine_lr(opt, steps)
    losses = []
    model.train()
    for _ in _progress(steps, "classifier", progress):
        x, y = _batch(train, batch_size, g)
        x = shift_augment(x, g) + noise_std * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(
            x.shape, generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_unet(model: nn.Module, train: DigitsSplit, schedule: NoiseSchedule, steps: int = 20000,
               batch_size: int = 128, lr: float = 2e-3, label_dropout: float = 0.1, ema_decay: float = 0.999,
               seed: int = 0, progress: bool = False) -> tuple[nn.Module, list[float]]:
    """Epsilon-matching with classifier-free label dropout; returns (EMA model, loss curve)."""
    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps)
    abar = schedule.alphas_cumprod.to(torch.float32)
    losses = []
    model.train()
    for _ in _progress(steps, "digits UNet", progress):
        x0, y = _batch(train, batch_size, g)
        y = torch.where(torch.rand(batch_size, generator=g) < label_dropout, torch.full_like(y, NULL_CLASS), y)
        t = torch.randint(0, abar.shape[0], (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, model, ema_decay)
        losses.append(loss.item())
    model.eval()
    return ema, losses


def distill_consistency(teacher: nn.Module, train: DigitsSplit, guidance_scale: float, steps: int = 4000,
                        batch_size: int = 128, lr: float = 2e-4, skip: int = 20, target_decay: float = 0.95,
                        ema_decay: float = 0.999, uncond_fraction: float = 0.5, seed: int = 0,
                        schedule: str = "cosine", clip_sample: float | None = 1.0,
                        progress: bool = False) -> tuple[ConsistencyModel, list[float]]:
    """Consistency distillation of the guided teacher's probability-flow ODE.

    Each step: x0 from the data, t ~ U{1..N-1}, s = max(t - skip, 0), x_t = q(x_t | x0); x_s = one DDIM (eta 0)
    step of the teacher (x0 clamped to [-clip_sample, clip_sample], as the sampler does) with classifier-free guidance (scale ``guidance_scale``; the unconditional teacher for the
    ``uncond_fraction`` of samples given the null label); loss ||f(x_t, t) - f_target(x_s, s)||^2 with f_target an
    EMA (``target_decay``) of f and f(., 0) = identity. The student starts as a copy of the teacher. Returns
    (slow-EMA student, loss curve).
    """
    g = torch.Generator().manual_seed(seed)
    n_train = teacher.num_train_steps
    student = ConsistencyModel(copy.deepcopy(teacher), n_train, schedule).train()
    target = copy.deepcopy(student).eval()
    shipped = copy.deepcopy(student).eval()
    guided = ClassifierFreeGuidance(teacher.eval(), guidance_scale)
    for p in list(target.parameters()) + list(shipped.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    abar = NoiseSchedule(ScheduleConfig(kind=schedule, num_train_steps=n_train), 1).alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps)
    losses = []
    for _ in _progress(steps, "consistency distillation", progress):
        x0, y = _batch(train, batch_size, g)
        y = torch.where(torch.rand(batch_size, generator=g) < uncond_fraction, torch.full_like(y, NULL_CLASS), y)
        t = torch.randint(1, n_train, (batch_size,), generator=g)
        s = (t - skip).clamp(min=0)
        a_t, a_s = abar[t].view(-1, 1, 1, 1), abar[s].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            # the null label gives the unconditional branch; x0 clamped to the data range like the sampler's
            x_s = ddim_ode_step(guided(x_t, t, y), x_t, a_t, a_s, clip=clip_sample)
            goal = target(x_s, s, y)
        loss = ((student(x_t, t, y) - goal) ** 2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(target, student, target_decay)
        _ema_update(shipped, student, ema_decay)
        losses.append(loss.item())
    return shipped, losses
