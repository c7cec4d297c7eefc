"""JPEG (in)compressibility rewards, as in DDPO: the size of each image saved as a JPEG at quality 95 with PIL.

Black-box (``differentiable = False``): the encoder is not differentiable, so the output carries no graph.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import ImageReward

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> list[float]:
    """images [B, 3, H, W] in [0, 1] -> sizes in kB (1000 bytes) of each one encoded as an 8-bit RGB JPEG."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return sizes


class JpegSize(ImageReward):
    """``sign * size_kB``: sign -1 rewards compressible images (jpeg_compressibility), +1 incompressible ones.
    forward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32 (kB; prompts are ignored)."""

    differentiable = False

    def __init__(self, sign: float, quality: int = JPEG_QUALITY):
        super().__init__()
        self.sign, self.quality = float(sign), int(quality)
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        sizes = torch.tensor(jpeg_sizes_kb(images, self.quality), dtype=torch.float32, device=images.device)
        return self.sign * sizes


def jpeg_compressibility() -> JpegSize:
    """Reward = -(JPEG size in kB)."""
    return JpegSize(-1.0)


def jpeg_incompressibility() -> JpegSize:
    """Reward = +(JPEG size in kB)."""
    return JpegSize(+1.0)
