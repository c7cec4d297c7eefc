"""Estimators of the clean sample x_0 from an intermediate state, behind one interface.

``estimator(policy, x, k, cond) -> x0_hat`` for a state x [B, *shape] at grid index k (int or [B], 0 .. T).
Gradients flow from x0_hat back into x (the networks' parameters stay frozen). At k == T the state is the
final sample, so every estimator returns x unchanged there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError
from .policy import DiffusionPolicy
from .schedule import ddim_sigma_coeffs, prediction_to_eps_and_x0


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


class ProbabilityFlowEstimator(X0Estimator):
    """x0 by solving the reference's probability-flow ODE from the state down to t = 0 with deterministic DDIM
    (eta = 0) steps: the exact consistency function of the reference, in the limit of many steps.

    Each state at training timestep t_k runs ``num_steps`` DDIM steps on the grid t_k (1 - j / n), j = 0 .. n,
    rounded to integers. Differentiable in x (backpropagates through every step), so it costs ``num_steps``
    reference calls per state and their backward passes; meant for small models and as the training-free stand-in
    for a distilled consistency model.
    """

    name = "ode"

    def __init__(self, num_steps: int = 10):
        if num_steps < 1:
            raise ConfigError(f"ode estimator num_steps={num_steps} must be >= 1")
        self.num_steps = num_steps

    def estimate(self, policy, x, k, cond):
        schedule = policy.schedule
        t_start = policy._timesteps.to(x.device)[k]  # [B]
        view = (-1, *([1] * (x.ndim - 1)))
        for j in range(self.num_steps):
            t_now = schedule.subgrid(t_start, j / self.num_steps).to(policy._timesteps.dtype)
            t_next = schedule.subgrid(t_start, (j + 1) / self.num_steps).to(policy._timesteps.dtype)
            with policy._reference_mode() as ref:
                pred = ref(x, t_now, cond)
            s_now, n_now = (c.to(x.dtype).view(view) for c in schedule.coefficients_at(t_now))
            s_next, n_next = (c.to(x.dtype).view(view) for c in schedule.coefficients_at(t_next))
            eps, x0 = prediction_to_eps_and_x0(pred, x, s_now, n_now, policy.prediction_type)
            x = s_next * x0 + n_next * eps
        return x


class ConsistencyEstimator(X0Estimator):
    """x0_hat = f(x, t_k, cond): one call of the frozen consistency model attached to the policy
    (``policy.attach_consistency_model``; the Trainer attaches the task's). Differentiable in x.

    The model must share the policy's training-timestep axis and have been distilled from the reference sampler
    (same guidance scale), so that f approximates the end of the reference's probability-flow ODE from x.
    """

    name = "consistency"

    def estimate(self, policy, x, k, cond):
        model = policy.consistency_model
        if model is None:
            raise ConfigError("estimator 'consistency' needs a consistency model: this task ships none; use "
                              "method.estimator=tweedie, or attach one with policy.attach_consistency_model(model)")
        t = policy._timesteps.to(x.device)[k]
        return model(x, t, cond).to(x.dtype)


ESTIMATORS = {"tweedie": TweedieEstimator, "ode": ProbabilityFlowEstimator, "consistency": ConsistencyEstimator}


def make_estimator(name: str, **kwargs) -> X0Estimator:
    if name not in ESTIMATORS:
        raise ConfigError(f"estimator={name!r} is not one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](**kwargs)


def reference_chain_x0(policy: DiffusionPolicy, x: torch.Tensor, k, cond, num_steps: int,
                       noises: list[torch.Tensor]) -> torch.Tensor:
    """Clean samples from short stochastic chains of the frozen reference, started at states x [B, *shape] at grid
    index k (int or [B]): ``num_steps - 1`` DDIM steps at eta = 1 (the posterior std between the two levels) on the
    grid t_k (1 - j / num_steps), then the reference's x0 prediction. ``noises``: num_steps - 1 tensors like x
    (the fixed, reparameterized step noise). Differentiable in x; costs num_steps reference calls per state. With
    num_steps = 1 it is Tweedie's estimate; as the chain is refined it samples p_ref(x_0 | x_t) (approximately,
    as the reference sampler does). States at k == T are returned unchanged."""
    if num_steps < 1:
        raise ConfigError(f"reference chain num_steps={num_steps} must be >= 1")
    if len(noises) != num_steps - 1:
        raise ValueError(f"need {num_steps - 1} noise tensors, got {len(noises)}")
    kk = policy._levels(x, k)
    final = (kk == policy.num_steps).view(-1, *([1] * (x.ndim - 1)))
    schedule = policy.schedule
    t_start = policy._timesteps.to(x.device)[kk.clamp(max=policy.num_steps)]
    view = (-1, *([1] * (x.ndim - 1)))
    z = x
    for j in range(num_steps):
        t_now = schedule.subgrid(t_start, j / num_steps).to(policy._timesteps.dtype)
        with policy._reference_mode() as ref:
            pred = ref(z, t_now, cond)
        s_now, n_now = (c.to(z.dtype).view(view) for c in schedule.coefficients_at(t_now))
        eps, x0 = prediction_to_eps_and_x0(pred, z, s_now, n_now, policy.prediction_type)
        if schedule.clip_sample is not None:
            x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
            eps = (z - s_now * x0) / n_now.clamp(min=1e-12)
        if j == num_steps - 1:
            z = x0
            break
        t_next = schedule.subgrid(t_start, (j + 1) / num_steps).to(policy._timesteps.dtype)
        s_next, n_next = (c.to(z.dtype).view(view) for c in schedule.coefficients_at(t_next))
        std = ddim_sigma_coeffs(s_now, n_now, s_next, n_next, 1.0).to(z.dtype)
        z = s_next * x0 + (n_next**2 - std**2).clamp(min=0).sqrt() * eps + std * noises[j]
    return torch.where(final, x, z)
