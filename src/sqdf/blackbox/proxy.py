"""Differentiable proxy rewards fit on the oracle's (sample, value) pairs, with an optimism term for exploration.

A proxy is ``features -> standardize -> small MLP``: a feature map turns samples x [B, *shape] (and conditions cond
[B] or None) into features [B, F]; features and targets are standardized with statistics taken at fit time; the
MLP predicts the standardized target. Two kinds (SEIKO-style):

* ``EnsembleProxy``: a bootstrap ensemble of MLP heads; reward = mean + optimism * std across members.
* ``UCBProxy``: one MLP; its last hidden layer phi(x) gives the ridge covariance A = ridge*I + Phi^T Phi over the
  queried data; reward = mean + bonus * sqrt(phi^T A^-1 phi).

Both are nn.Modules, refit from scratch by every ``fit`` call and frozen (requires_grad False) afterwards: gradients
flow to x, never into the proxy, so an optimizer of the diffusion policy cannot touch it. Fitting is deterministic
given ``seed`` (its own generator; the global RNG is left alone). The proxy's dtype follows the fit data (float64
stays float64, anything else becomes float32) and it lives on the data's device; outputs come back in that dtype.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from numbers import Integral, Real

import torch
from torch import nn

from ..errors import ConfigError
from ..models.ensemble import (
    EnsembleMLP,
    check_features,
    feature_matrix,
    ridge_inverse,
    standardization,
    uniform_init,
)
from ..models.features import as_feature_map


# ---- the proxies -----------------------------------------------------------------------------------------------
def _real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _check(name: str, value, ok: bool, need: str) -> None:
    if not ok:
        raise ConfigError(f"proxy option {name}={value!r} must be {need}")


class _Proxy(nn.Module, ABC):
    """Shared plumbing: option checks, feature extraction, standardization, the fit loop, freezing."""

    def __init__(self, feature_map, hidden: int, epochs: int, lr: float, weight_decay: float, batch_size: int,
                 seed: int):
        super().__init__()
        _check("hidden", hidden, isinstance(hidden, Integral) and hidden >= 1, "an int >= 1 (MLP width)")
        _check("epochs", epochs, isinstance(epochs, Integral) and epochs >= 1, "an int >= 1 (passes over the data)")
        _check("lr", lr, _real(lr) and lr > 0, "> 0 (Adam learning rate)")
        _check("weight_decay", weight_decay, _real(weight_decay) and weight_decay >= 0, ">= 0")
        _check("batch_size", batch_size, isinstance(batch_size, Integral) and batch_size >= 1,
               "an int >= 1 (minibatch size; data no larger than it is fit full-batch)")
        self.feature_map = as_feature_map(feature_map)
        self.hidden, self.epochs, self.lr = int(hidden), int(epochs), float(lr)
        self.weight_decay, self.batch_size, self.seed = float(weight_decay), int(batch_size), int(seed)
        self.fitted = False
        self.num_fit = 0  # data points of the last fit

    # -- features --
    def _raw_features(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return check_features(self.feature_map(x, cond), x.shape[0])

    def _z(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Standardized features [B, F] in the proxy's dtype (differentiable in x)."""
        if not self.fitted:
            raise ConfigError("this proxy has not been fit; call fit(x, cond, y) on the oracle's labels first")
        f = self._raw_features(x, cond)
        if f.shape[1] != self.f_mean.shape[0]:
            raise ConfigError(f"the feature map returned {f.shape[1]} features but the proxy was fit on "
                              f"{self.f_mean.shape[0]}; use the same feature map and sample shape")
        return (f.to(self.f_mean.dtype) - self.f_mean) / self.f_std

    # -- fitting --
    def fit(self, x: torch.Tensor, cond: torch.Tensor | None, y: torch.Tensor) -> "_Proxy":
        """Refit from scratch on x [N, *shape], cond [N] or None, y [N]; freezes the parameters. Returns self."""
        n = x.shape[0]
        y = torch.as_tensor(y)
        if y.numel() != n:
            raise ConfigError(f"fit got {n} samples but {y.numel()} targets; y must be [N]")
        if cond is not None and cond.shape[0] != n:
            raise ConfigError(f"fit got {n} samples but {cond.shape[0]} conditions; cond must be [N] or None")
        if n < 2:
            raise ConfigError(f"fit needs at least 2 labelled samples; got {n} (query the oracle for more first)")
        bad = ~torch.isfinite(y.reshape(-1))
        if bad.any():
            rows = bad.nonzero().reshape(-1)[:8].tolist()
            raise ConfigError(f"{int(bad.sum())} fit targets are NaN/inf (rows {rows}...); drop those samples "
                              "before fitting the proxy")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        f = feature_matrix(self.feature_map, x, cond, dtype)
        y = y.detach().reshape(-1).to(device=f.device, dtype=dtype)
        f_mean, f_std = standardization(f)  # constant features are only centered
        y_mean, y_std = y.mean(), y.std(correction=0)
        y_std = y_std if y_std > 1e-12 * (1 + y_mean.abs()) else torch.ones_like(y_std)
        for name, value in (("f_mean", f_mean), ("f_std", f_std), ("y_mean", y_mean), ("y_std", y_std)):
            self.register_buffer(name, value)
        z, t = (f - f_mean) / f_std, (y - y_mean) / y_std
        gen = torch.Generator().manual_seed(self.seed)
        self._build(z.shape[1], dtype, f.device, gen)  # fresh parameters (requires_grad True) every fit
        with torch.enable_grad():
            self._train(z, t, gen)
        self._after_fit(z)
        for q in self.parameters():
            q.grad = None  # no training gradients left behind
        self.requires_grad_(False).eval()
        self.fitted, self.num_fit = True, n
        return self

    def _batches(self, n: int, gen: torch.Generator, device) -> list[torch.Tensor | None]:
        """Index batches for one epoch (None: the full batch)."""
        if n <= self.batch_size:
            return [None]
        perm = torch.randperm(n, generator=gen).to(device)
        return list(perm.split(self.batch_size))

    def _adam(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # -- subclass hooks --
    @abstractmethod
    def _build(self, in_dim: int, dtype, device, gen) -> None:
        """Create the parameters for standardized features of width in_dim."""

    @abstractmethod
    def _train(self, z: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> None:
        """Fit the parameters to standardized features z [N, F] and targets t [N]."""

    def _after_fit(self, z: torch.Tensor) -> None:
        pass

    @abstractmethod
    def predict(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B], uncertainty term [B]) in the units of the targets."""


class EnsembleProxy(_Proxy):
    """A bootstrap ensemble of MLP heads (2 hidden layers of ``hidden``, SiLU) on standardized features.

    Args:
        feature_map: a FeatureMap (or callable f(x, cond) -> [B, F]).
        members: heads (>= 2); each is trained on its own bootstrap resample of the data.
        hidden: MLP width.
        optimism: forward = mean + optimism * std across members (>= 0; 0 gives the plain mean).
        epochs, lr, weight_decay, batch_size: AdamW over ``epochs`` passes; data no larger than ``batch_size`` is
            fit full-batch (one step per epoch).
        seed: seeds the init, the bootstrap and the minibatch order.
    """

    def __init__(self, feature_map, members: int = 4, hidden: int = 64, optimism: float = 0.0, epochs: int = 300,
                 lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 512, seed: int = 0):
        _check("members", members, isinstance(members, Integral) and members >= 2,
               "an int >= 2 (an ensemble of one has no spread)")
        _check("optimism", optimism, _real(optimism) and optimism >= 0, ">= 0 (0: the plain ensemble mean)")
        super().__init__(feature_map, hidden, epochs, lr, weight_decay, batch_size, seed)
        self.members, self.optimism = int(members), float(optimism)

    def _build(self, in_dim, dtype, device, gen):
        self.heads = EnsembleMLP(self.members, in_dim, self.hidden, dtype, device, gen)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """z [M, B, F] (or [B, F], shared by all members) -> standardized predictions [M, B]."""
        return self.heads(z)

    def _train(self, z, t, gen):
        n = z.shape[0]
        boot = torch.randint(n, (self.members, n), generator=gen).to(z.device)  # [M, N] bootstrap rows
        full = (z[boot], t[boot]) if n <= self.batch_size else None  # [M, N, F], [M, N]; gathered per batch else
        opt = self._adam()
        for _ in range(self.epochs):
            for idx in self._batches(n, gen, z.device):
                rows = None if idx is None else boot[:, idx]
                zi, ti = full if rows is None else (z[rows], t[rows])
                # summed over members: each head gets the gradient of its own mean squared error
                loss = ((self._heads(zi) - ti) ** 2).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def predict(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ensemble mean [B], ensemble std [B]) in the units of y; differentiable in x."""
        p = self._heads(self._z(x, cond))  # [M, B]
        mean = p.mean(0) * self.y_std + self.y_mean
        std = torch.sqrt(p.var(0, correction=1) + 1e-12) * self.y_std  # eps keeps the gradient finite at 0 spread
        return mean, std

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Optimistic reward [B] = mean + optimism * std."""
        mean, std = self.predict(x, cond)
        return mean if self.optimism == 0 else mean + self.optimism * std


class UCBProxy(_Proxy):
    """One MLP (2 hidden layers of ``hidden``, SiLU) with a ridge-regression confidence bonus on its last hidden
    layer phi(x) [B, hidden]: A = ridge*I + Phi^T Phi over the fit data,
    forward = mean + bonus * sqrt(phi^T A^-1 phi) * std(y).

    Args:
        feature_map: a FeatureMap (or callable f(x, cond) -> [B, F]).
        hidden: MLP width (also the size of A).
        bonus: weight of the confidence term (>= 0; 0 gives the plain mean).
        ridge: the prior precision added to A (> 0).
        epochs, lr, weight_decay, batch_size, seed: as for EnsembleProxy.
    """

    def __init__(self, feature_map, hidden: int = 64, bonus: float = 1.0, ridge: float = 1.0, epochs: int = 300,
                 lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 512, seed: int = 0):
        _check("bonus", bonus, _real(bonus) and bonus >= 0, ">= 0 (0: the plain MLP mean)")
        _check("ridge", ridge, _real(ridge) and ridge > 0, "> 0 (the prior precision keeps A invertible)")
        super().__init__(feature_map, hidden, epochs, lr, weight_decay, batch_size, seed)
        self.bonus, self.ridge = float(bonus), float(ridge)

    def _build(self, in_dim, dtype, device, gen):
        h = self.hidden
        self.w1 = uniform_init((in_dim, h), in_dim, dtype, device, gen)
        self.b1 = uniform_init((h,), in_dim, dtype, device, gen)
        self.w2 = uniform_init((h, h), h, dtype, device, gen)
        self.b2 = uniform_init((h,), h, dtype, device, gen)
        self.w3 = uniform_init((h, 1), h, dtype, device, gen)
        self.b3 = uniform_init((1,), h, dtype, device, gen)

    def _phi(self, z: torch.Tensor) -> torch.Tensor:
        """Last hidden layer [B, hidden]."""
        a = nn.functional.silu(torch.addmm(self.b1, z, self.w1))
        return nn.functional.silu(torch.addmm(self.b2, a, self.w2))

    def _train(self, z, t, gen):
        opt = self._adam()
        for _ in range(self.epochs):
            for idx in self._batches(z.shape[0], gen, z.device):
                zi, ti = (z, t) if idx is None else (z[idx], t[idx])
                loss = ((torch.addmm(self.b3, self._phi(zi), self.w3).squeeze(-1) - ti) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def _after_fit(self, z):
        with torch.no_grad():
            phi = torch.cat([self._phi(z[s:s + 4096]) for s in range(0, z.shape[0], 4096)])
            self.register_buffer("a_inv", ridge_inverse(phi, self.ridge).to(z.dtype))

    def predict(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B], bonus term [B] = bonus * sqrt(phi^T A^-1 phi) * std(y)) in the units of y; differentiable."""
        phi = self._phi(self._z(x, cond))
        mean = torch.addmm(self.b3, phi, self.w3).squeeze(-1) * self.y_std + self.y_mean
        quad = ((phi @ self.a_inv) * phi).sum(-1).clamp_min(0)
        return mean, self.bonus * torch.sqrt(quad + 1e-12) * self.y_std

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Optimistic reward [B] = mean + bonus term."""
        mean, term = self.predict(x, cond)
        return mean if self.bonus == 0 else mean + term


PROXIES = {"ensemble": EnsembleProxy, "ucb": UCBProxy}


def make_proxy(kind: str, feature_map, **options) -> _Proxy:
    """An unfit proxy of ``kind`` ('ensemble' or 'ucb') on ``feature_map``; options go to its constructor."""
    if kind not in PROXIES:
        raise ConfigError(f"unknown proxy kind {kind!r}; choose one of {sorted(PROXIES)}")
    cls = PROXIES[kind]
    allowed = [p for p in inspect.signature(cls).parameters if p != "feature_map"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for proxy kind {kind!r}; valid options are {allowed}")
    return cls(feature_map, **options)
