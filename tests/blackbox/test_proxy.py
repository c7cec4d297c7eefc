"""Proxy rewards: fit a noisy quadratic, more uncertainty away from the data, exact gradients, determinism, frozen
parameters, feature maps, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sqdf.blackbox.proxy import EnsembleProxy, UCBProxy, make_proxy
from sqdf.errors import ConfigError
from sqdf.models.features import ModuleFeatures, RawFeatures

B = torch.tensor([0.5, -0.3], dtype=torch.float64)
FAST = dict(hidden=32, epochs=200, lr=1e-2)


def quadratic(x):
    return -((x - B.to(x.dtype)) ** 2).sum(1)


def data(n=256, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype) * 4 - 2
    return x, quadratic(x) + 0.1 * torch.randn(n, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def fitted(one_thread):
    x, y = data()
    return {"ensemble": make_proxy("ensemble", RawFeatures(), optimism=1.0, **FAST).fit(x, None, y),
            "ucb": make_proxy("ucb", RawFeatures(), bonus=1.0, **FAST).fit(x, None, y)}


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_mean_fits_a_noisy_quadratic(fitted, kind):
    x, _ = data(200, seed=1)
    x = x * 0.9  # held out, inside the data region
    mean, _ = fitted[kind].predict(x)
    y = quadratic(x)
    r2 = 1 - ((mean - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert mean.shape == (200,) and r2 > 0.9


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_uncertainty_grows_away_from_the_data(fitted, kind):
    inside, _ = data(100, seed=2)
    g = torch.Generator().manual_seed(3)
    far = torch.randn(100, 2, generator=g, dtype=torch.float64)
    far = 8 * far / far.norm(dim=1, keepdim=True)
    _, u_in = fitted[kind].predict(inside)
    _, u_far = fitted[kind].predict(far)
    assert (u_in >= 0).all() and u_far.mean() > 3 * u_in.mean()


def test_forward_is_mean_plus_the_optimism_term(fitted):
    x = data(16, seed=4)[0]
    for p in fitted.values():
        mean, u = p.predict(x)
        torch.testing.assert_close(p(x), mean + u)  # optimism = bonus = 1
    xs, ys = data(64)
    ens = EnsembleProxy(RawFeatures(), optimism=0.0, **FAST).fit(xs, None, ys)
    torch.testing.assert_close(ens(x), ens.predict(x)[0])
    ens.optimism = 2.5
    mean, std = ens.predict(x)
    torch.testing.assert_close(ens(x), mean + 2.5 * std)
    ucb = UCBProxy(RawFeatures(), bonus=0.0, **FAST).fit(xs, None, ys)
    torch.testing.assert_close(ucb(x), ucb.predict(x)[0])


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_gradient_wrt_x_matches_finite_differences(fitted, kind):
    x = data(6, seed=5)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fitted[kind](v), (x,))


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_parameters_are_frozen_after_fit_and_gradients_reach_x(fitted, kind):
    p = fitted[kind]
    params = list(p.parameters())
    assert params and not any(q.requires_grad for q in params)
    x = data(8, seed=6)[0].requires_grad_(True)
    p(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(q.grad is None for q in params)


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_fit_is_deterministic_given_the_seed_and_refits_from_scratch(one_thread, kind):
    x, y = data(64)
    xq = data(10, seed=7)[0]
    opts = dict(hidden=16, epochs=30, batch_size=16)  # minibatches, so the shuffling is covered too
    a = make_proxy(kind, RawFeatures(), seed=3, **opts).fit(x, None, y)
    out = a(xq)
    b = make_proxy(kind, RawFeatures(), seed=3, **opts).fit(x, None, y)
    assert torch.equal(out, b(xq))
    assert not torch.equal(out, make_proxy(kind, RawFeatures(), seed=4, **opts).fit(x, None, y)(xq))
    a.fit(x[:32], None, y[:32])  # a refit sees only the new data ...
    assert not torch.equal(out, a(xq))
    a.fit(x, None, y)  # ... and starts from scratch
    assert torch.equal(out, a(xq))


def test_float32_data_gives_a_float32_proxy(one_thread):
    x, y = data(32, dtype=torch.float32)
    p = EnsembleProxy(RawFeatures(), optimism=1.0, hidden=8, epochs=5).fit(x, None, y)
    assert p(x).dtype == torch.float32 and all(q.dtype == torch.float32 for q in p.parameters())


def test_conditional_raw_features_and_module_features(one_thread):
    x = torch.randn(4, 1, 3, 3)
    cond = torch.tensor([0, 2, 1, 2])
    f = RawFeatures(num_classes=3)(x, cond)
    assert f.shape == (4, 9 + 3)
    torch.testing.assert_close(f[:, 9:], nn.functional.one_hot(cond, 3).float())
    with pytest.raises(ConfigError, match="needs conditions"):
        RawFeatures(num_classes=3)(x, None)
    with pytest.raises(ConfigError, match=r"outside \[0, 3\)"):
        RawFeatures(num_classes=3)(x, torch.tensor([0, 1, 2, 3]))

    # a per-class offset that only the condition explains
    g = torch.Generator().manual_seed(8)
    xs = torch.rand(128, 2, generator=g, dtype=torch.float64) * 2 - 1
    cs = torch.randint(2, (128,), generator=g)
    ys = quadratic(xs) + 3.0 * cs
    p = EnsembleProxy(RawFeatures(num_classes=2), **FAST).fit(xs, cs, ys)
    gap = p(xs, torch.ones_like(cs)) - p(xs, torch.zeros_like(cs))
    assert (gap - 3.0).abs().mean() < 0.5

    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 5)).double()
    fm = ModuleFeatures(lambda v, c: net(v), dim=5)
    ModuleFeatures(net, dim=5)  # wrapping an nn.Module freezes it
    assert not any(q.requires_grad for q in net.parameters())
    xi = torch.randn(32, 1, 3, 3, dtype=torch.float64)
    ucb = UCBProxy(fm, **FAST).fit(xi, None, xi.flatten(1).sum(1))
    assert ucb(xi).shape == (32,) and "feature_map" not in dict(ucb.named_modules())
    with pytest.raises(ConfigError, match="declares dim=4 but returned 5"):
        UCBProxy(ModuleFeatures(lambda v, c: net(v), dim=4), **FAST).fit(xi, None, xi.flatten(1).sum(1))
    with pytest.raises(ConfigError, match=r"must return \[B, F\]"):
        UCBProxy(lambda v, c: v.sum(), **FAST).fit(xi, None, xi.flatten(1).sum(1))


def test_bad_kind_and_options_are_config_errors():
    fm = RawFeatures()
    with pytest.raises(ConfigError, match=r"unknown proxy kind 'gp'; choose one of \['ensemble', 'ucb'\]"):
        make_proxy("gp", fm)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bonus'\] for proxy kind 'ensemble'"):
        make_proxy("ensemble", fm, bonus=1.0)
    bad = [("ensemble", "members", 1), ("ensemble", "hidden", 0), ("ensemble", "optimism", -0.5),
           ("ensemble", "optimism", math.nan), ("ucb", "bonus", -1.0), ("ucb", "ridge", 0.0),
           ("ucb", "epochs", 0), ("ucb", "lr", 0.0), ("ucb", "weight_decay", -1.0), ("ensemble", "batch_size", 0)]
    for kind, key, value in bad:
        with pytest.raises(ConfigError, match=f"proxy option {key}="):
            make_proxy(kind, fm, **{key: value})
    with pytest.raises(ConfigError, match="feature_map must be"):
        make_proxy("ucb", 3)


@pytest.mark.parametrize("kind", ["ensemble", "ucb"])
def test_too_little_data_nan_targets_and_unfit_use_are_config_errors(kind):
    p = make_proxy(kind, RawFeatures(), hidden=4, epochs=2)
    x, y = data(8)
    with pytest.raises(ConfigError, match="has not been fit"):
        p(x)
    with pytest.raises(ConfigError, match="at least 2 labelled samples; got 1"):
        p.fit(x[:1], None, y[:1])
    y_nan = y.clone()
    y_nan[3] = math.nan
    with pytest.raises(ConfigError, match=r"1 fit targets are NaN/inf \(rows \[3\]"):
        p.fit(x, None, y_nan)
    with pytest.raises(ConfigError, match="8 samples but 7 targets"):
        p.fit(x, None, y[:7])
    p.fit(x[:2], None, y[:2])  # two points are enough
    assert p(x).shape == (8,)
