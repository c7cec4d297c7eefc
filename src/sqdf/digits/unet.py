"""A compact class-conditional UNet for 8x8 images, and classifier-free guidance around it.

``DigitUNet(x [B, 1, 8, 8], t [B] training timesteps, cond [B] labels 0..9 or None) -> eps [B, 1, 8, 8]``.
Label ``NULL_CLASS`` (10), or ``cond=None``, is the unconditional branch used by classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models.denoisers import timestep_embedding
from .data import NUM_CLASSES

NULL_CLASS = NUM_CLASSES


def _labels(cond: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Class labels [n] long; None -> the null class. Accepts [n] or [n, 1] integer-valued tensors."""
    if cond is None:
        return torch.full((n,), NULL_CLASS, dtype=torch.long, device=device)
    labels = cond.reshape(n, -1)[:, 0].round().long() if cond.is_floating_point() else cond.reshape(n, -1)[:, 0]
    if bool(((labels < 0) | (labels > NULL_CLASS)).any()):
        raise ValueError(f"digit labels must lie in 0..{NULL_CLASS} ({NULL_CLASS} = unconditional), "
                         f"got values {sorted(set(labels.tolist()))}")
    return labels


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding added in between and a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitUNet(nn.Module):
    """Two resolutions (8x8 and 4x4), one ResBlock per level, skip connection, time + class embeddings.

    Args:
        channels: widths at 8x8 and 4x4.
        emb_dim: width of the time/class embedding.
        num_train_steps: N of the VP schedule (scales the timestep embedding).
        prediction_type: what the output means ("epsilon" for the shipped base model; "sample" for the
            consistency model's network).
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), emb_dim: int = 128, num_train_steps: int = 1000,
                 prediction_type: str = "epsilon"):
        super().__init__()
        c1, c2 = channels
        self.channels, self.emb_dim, self.num_train_steps = (c1, c2), emb_dim, num_train_steps
        self.prediction_type = prediction_type
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)
        self.mid = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(2 * c2, c2, emb_dim)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)

    def arch(self) -> dict:
        """Constructor arguments (stored in the safetensors metadata of shipped weights)."""
        return {"channels": list(self.channels), "emb_dim": self.emb_dim, "num_train_steps": self.num_train_steps,
                "prediction_type": self.prediction_type}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitUNet takes images [B, 1, 8, 8], got {tuple(x.shape)}")
        n = x.shape[0]
        t = t.expand(n) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim, self.num_train_steps))
        emb = F.silu(emb + self.class_emb(_labels(cond, n, x.device)))
        h1 = self.down1(self.conv_in(x), emb)  # [B, c1, 8, 8]
        h2 = self.down2(self.downsample(h1), emb)  # [B, c2, 4, 4]
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class ClassifierFreeGuidance(nn.Module):
    """eps = eps(x, t, null) + scale * (eps(x, t, c) - eps(x, t, null)); scale 1 is the plain conditional model.

    Wraps a conditional denoiser whose ``cond=None`` call is its unconditional branch; the two branches run as one
    batch. Its parameters are the wrapped model's, so fine-tuning it fine-tunes both branches.
    """

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.prediction_type = getattr(model, "prediction_type", "epsilon")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None or self.scale == 1.0:
            return self.model(x, t, cond)
        n = x.shape[0]
        t = t.expand(n) if t.ndim == 0 else t
        labels = _labels(cond, n, x.device)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]),
                          torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
        cond_out, uncond_out = both[:n], both[n:]
        return uncond_out + self.scale * (cond_out - uncond_out)
