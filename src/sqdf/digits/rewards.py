"""Rewards on digit images x [B, 1, 8, 8] in [-1, 1] -> [B].

Differentiable: the shipped classifier's log-probability of a target digit (fixed, or the condition's label
shifted by an offset: "make a 1 look like a 7"). Black-box (no gradient): ink amount and PNG/JPEG compressibility.
"""

from __future__ import annotations

import io

import torch
from torch import nn
from torch.nn import functional as F

from .data import NUM_CLASSES, unit_to_pixels01


class ClassifierLogProb(nn.Module):
    """r(x, c) = log p_clf(target | x) with target = ``digit`` if given, else (c + ``offset``) mod 10.

    Args:
        classifier: maps [B, 1, 8, 8] to logits [B, 10]; frozen here.
        digit: a fixed target digit 0..9, or None to derive it from the condition.
        offset: with digit None, the target is the condition's label plus offset (0: "look like your own class").
    """

    differentiable = True

    def __init__(self, classifier: nn.Module, digit: int | None = 3, offset: int = 0):
        super().__init__()
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.digit, self.offset = digit, offset

    def targets(self, n: int, cond: torch.Tensor | None, device) -> torch.Tensor:
        if self.digit is not None:
            return torch.full((n,), self.digit, dtype=torch.long, device=device)
        if cond is None:
            raise ValueError("this reward derives its target digit from the condition, but the samples have none; "
                             "set task.target_digit or task.digit_condition")
        return (cond.reshape(n, -1)[:, 0].long() + self.offset) % NUM_CLASSES

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.classifier.parameters()).dtype
        logp = F.log_softmax(self.classifier(x.to(dtype)), dim=1)
        return logp.gather(1, self.targets(x.shape[0], cond, x.device)[:, None])[:, 0].to(x.dtype)


def ink(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pixel intensity in [0, 1] (more ink, bolder strokes)."""
    return unit_to_pixels01(x).flatten(1).mean(1)


def _to_uint8_images(x: torch.Tensor):
    return (unit_to_pixels01(x.detach().to(torch.float32).cpu())[:, 0] * 255).round().to(torch.uint8).numpy()


def compressibility(x: torch.Tensor, cond: torch.Tensor | None = None, fmt: str = "PNG") -> torch.Tensor:
    """-(compressed size in bytes) / 64 of each image as an 8-bit grayscale PNG or JPEG (quality 95); black-box."""
    from PIL import Image

    sizes = []
    for img in _to_uint8_images(x):
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        sizes.append(len(buf.getvalue()))
    return -torch.tensor(sizes, dtype=x.dtype, device=x.device) / 64.0


def png_compressibility(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    return compressibility(x, cond, "PNG")


def jpeg_compressibility(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    return compressibility(x, cond, "JPEG")
