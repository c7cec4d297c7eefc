"""A small CNN digit classifier: logits for rewards, penultimate features for Frechet distance and diversity.

``DigitClassifier(x [B, 1, 8, 8] in [-1, 1]) -> logits [B, 10]``; ``features(x) -> [B, feature_dim]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .data import NUM_CLASSES


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 32):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def arch(self) -> dict:
        return {"width": self.width, "feature_dim": self.feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim]."""
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitClassifier takes images [B, 1, 8, 8], got {tuple(x.shape)}")
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
