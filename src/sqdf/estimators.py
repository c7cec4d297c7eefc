"""Estimators of the clean sample x_0 from an intermediate state, behind one interface.

``estimator(policy, x, k, cond) -> x0_hat`` for a state x [B, *shape] at grid index k (int or [B], 0 .. T).
Gradients flow from x0_hat back into x (the networks' parameters stay frozen). At k == T the state is the
final sample, so every estimator returns x unchanged there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .errors import ConfigError
from .policy import DiffusionPolicy


class X0Estimator(ABC):
    name = "estimator"

    def __call__(self, policy: DiffusionPolicy, x: torch.Tensor, k, cond: torch.Tensor | None = None) -> torch.Tensor:
        kk = policy._levels(x, k)
        final = (kk == policy.num_steps).view(-1, *([1] * (x.ndim - 1)))
        if bool(final.all()):
            return x
        est = self.estimate(policy, x, kk.clamp(max=policy.num_steps), cond)
        return torch.where(final, x, est)

    @abstractmethod
    def estimate(self, policy: DiffusionPolicy, x: torch.Tensor, k: torch.Tensor, cond) -> torch.Tensor:
        """x0_hat for states at grid indices k [B]."""


class TweedieEstimator(X0Estimator):
    """Tweedie's formula with the frozen reference: x0_hat = (x - sqrt(1 - abar) eps_ref(x)) / sqrt(abar)."""

    name = "tweedie"

    def estimate(self, policy, x, k, cond):
        _, x0 = policy.predict(x, k, cond, which="reference")
        return x0


ESTIMATORS = {"tweedie": TweedieEstimator}


def make_estimator(name: str) -> X0Estimator:
    if name not in ESTIMATORS:
        raise ConfigError(f"estimator={name!r} is not one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]()
