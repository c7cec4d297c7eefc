"""Feature maps: differentiable ``features(x [B, *shape], cond [B] or None) -> [B, F]`` of samples.

A task offers one (``Task.proxy_features``) for models fit on its samples: the black-box proxy rewards today
(``sqdf.blackbox.proxy``), reward models learned from preferences next. ``RawFeatures`` flattens the sample (with a
one-hot of its condition); ``ModuleFeatures`` wraps a frozen network (a classifier's penultimate layer, CLIP image
embeddings).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


class FeatureMap(ABC):
    """``features(x [B, *shape], cond [B] or None) -> [B, F]``, differentiable in x. ``dim``: F, or None if it is
    only known once samples are seen. Subclass and implement ``features``; instances are also callable."""

    dim: int | None = None

    @abstractmethod
    def features(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """[B, F] features of samples x with conditions cond."""

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(x, cond)


class RawFeatures(FeatureMap):
    """x flattened to [B, prod(shape)], with a one-hot of cond [B] (long) appended when ``num_classes`` is given."""

    def __init__(self, num_classes: int | None = None):
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"RawFeatures num_classes={num_classes} must be >= 1, or None for unconditional samples")
        self.num_classes = num_classes

    def features(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        f = x.flatten(1)
        if self.num_classes is None:
            return f
        if cond is None:
            raise ConfigError(f"RawFeatures(num_classes={self.num_classes}) needs conditions cond [B]; got None "
                              "(pass cond, or use RawFeatures() for unconditional samples)")
        cond = cond.reshape(-1).long()
        if cond.numel() and (cond.min() < 0 or cond.max() >= self.num_classes):
            raise ConfigError(f"a condition is outside [0, {self.num_classes}) (got {cond.min().item()}.."
                              f"{cond.max().item()}); set num_classes to the number of classes")
        onehot = torch.nn.functional.one_hot(cond, self.num_classes).to(device=f.device, dtype=f.dtype)
        return torch.cat([f, onehot], dim=1)


class ModuleFeatures(FeatureMap):
    """Wraps a frozen nn.Module or any callable ``f(x, cond) -> [B, F]`` (a classifier's penultimate layer, CLIP
    image embeddings, ...). An nn.Module is switched to eval() and requires_grad_(False) here. It is kept out of the
    proxy's module tree (not in its state_dict, not moved by ``.to()``): put it on the samples' device yourself."""

    def __init__(self, module: Callable, dim: int | None = None):
        if not callable(module):
            raise ConfigError(f"ModuleFeatures needs a callable f(x, cond) -> [B, F]; got {type(module).__name__}")
        if dim is not None and dim < 1:
            raise ConfigError(f"ModuleFeatures dim={dim} must be >= 1 (the feature width F), or None to infer it")
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
        self.module, self.dim = module, dim

    def features(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.module(x, cond)


def as_feature_map(fm) -> FeatureMap:
    """``fm`` itself when it is a FeatureMap, else a callable ``f(x, cond) -> [B, F]`` wrapped in ModuleFeatures."""
    if isinstance(fm, FeatureMap):
        return fm
    if callable(fm):
        return ModuleFeatures(fm)
    raise ConfigError(f"feature_map must be a FeatureMap or a callable f(x, cond) -> [B, F]; got {type(fm).__name__}")
