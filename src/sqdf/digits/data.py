"""scikit-learn's 8x8 handwritten digits as image tensors, with a fixed held-out split.

Images are [N, 1, 8, 8] float32 in [-1, 1] (the 0..16 pixel counts mapped linearly); labels [N] long in 0..9.
The split is stratified by class and fixed by ``seed``: 75% train (1,347 images), 25% held out (450).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """One split: images [N, 1, 8, 8] in [-1, 1] and labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def of_class(self, digit: int) -> torch.Tensor:
        """Images of one digit, [n_c, 1, 8, 8]."""
        return self.images[self.labels == digit]


def pixels_to_unit(values: torch.Tensor) -> torch.Tensor:
    """sklearn pixel counts 0..16 -> [-1, 1]."""
    return values / 8.0 - 1.0


def unit_to_pixels01(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1] intensities (clamped), for pictures and ink rewards."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


@lru_cache(maxsize=4)
def load_digits_split(seed: int = 0, held_out: float = 0.25) -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held_out) splits of the 1,797 sklearn digits, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = pixels_to_unit(torch.tensor(data.images, dtype=torch.float32)).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=held_out, random_state=seed, stratify=data.target
    )
    idx_train, idx_test = torch.tensor(sorted(idx_train)), torch.tensor(sorted(idx_test))
    return DigitsSplit(x[idx_train], y[idx_train]), DigitsSplit(x[idx_test], y[idx_test])
