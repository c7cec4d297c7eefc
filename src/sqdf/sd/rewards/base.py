"""What an image reward is, shared preprocessing, and the missing-weights error.

Every reward maps decoded images ``[B, 3, H, W]`` (float, RGB, values in [0, 1]) and their prompts (``list[str]``
of length B) to rewards ``[B]`` (float32). A reward with ``differentiable = True`` lets gradients flow from the
output back into the images (all preprocessing is done with differentiable tensor ops); a black-box one
(``differentiable = False``) returns a tensor without a graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MissingWeightsError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageReward(nn.Module):
    """Base class: ``reward(images [B, 3, H, W] in [0, 1], prompts list[str]) -> [B]``. Frozen (no trainable
    parameters); ``differentiable`` says whether gradients reach the images."""

    name: str = "reward"
    differentiable: bool = True

    def freeze(self) -> "ImageReward":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def check_inputs(self, images: torch.Tensor, prompts: list[str]) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} reward expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name} reward got {images.shape[0]} images but {len(prompts)} prompts")


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's image preprocessing as differentiable tensor ops: resize the shorter side to ``size`` (bicubic,
    antialiased), center-crop to ``size`` x ``size``, normalize. images [B, 3, H, W] in [0, 1] -> [B, 3, size, size]."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    images = images[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def require_path(path: str | None, what: str, expected: str, source: str, option: str = "--reward-weights") -> str:
    """Return ``path`` if it exists, else raise MissingWeightsError naming what is missing, the expected layout,
    where the weights come from and how to point the library at them."""
    if path is None:
        raise MissingWeightsError(
            f"the {what} needs local weights and none were given; download {source} and pass {option} PATH "
            f"(expected: {expected})")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise MissingWeightsError(
            f"{what}: {path!r} does not exist; expected {expected}. Get it from {source} (no machine here reaches a "
            f"model hub, so copy the files there first) and pass {option} PATH")
    return path
