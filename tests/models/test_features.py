"""Feature maps: raw vectors with a condition one-hot, wrapped modules (frozen), and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqdf.errors import ConfigError
from sqdf.models.features import FeatureMap, ModuleFeatures, RawFeatures, as_feature_map


def test_raw_features_flatten_and_append_the_condition_one_hot():
    x = torch.randn(4, 1, 3, 3)
    torch.testing.assert_close(RawFeatures()(x), x.flatten(1))
    cond = torch.tensor([0, 2, 1, 2])
    f = RawFeatures(num_classes=3)(x, cond)
    torch.testing.assert_close(f, torch.cat([x.flatten(1), nn.functional.one_hot(cond, 3).float()], dim=1))
    with pytest.raises(ConfigError, match="needs conditions"):
        RawFeatures(num_classes=3)(x, None)
    with pytest.raises(ConfigError, match=r"outside \[0, 3\)"):
        RawFeatures(num_classes=3)(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="num_classes=0 must be >= 1"):
        RawFeatures(num_classes=0)


def test_module_features_freeze_the_module_and_keep_gradients_to_x():
    net = nn.Linear(9, 5)
    fm = ModuleFeatures(lambda v, c: net(v.flatten(1)), dim=5)
    ModuleFeatures(net)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    fm(x).sum().backward()
    torch.testing.assert_close(x.grad.flatten(1), net.weight.sum(0).expand(2, 9))
    with pytest.raises(ConfigError, match="dim=0 must be >= 1"):
        ModuleFeatures(net, dim=0)
    with pytest.raises(ConfigError, match="needs a callable"):
        ModuleFeatures(3)


def test_as_feature_map_wraps_callables_and_refuses_the_rest():
    fm = RawFeatures()
    assert as_feature_map(fm) is fm
    wrapped = as_feature_map(lambda v, c: v * 2)
    assert isinstance(wrapped, FeatureMap) and torch.equal(wrapped(torch.ones(1, 2)), torch.full((1, 2), 2.0))
    with pytest.raises(ConfigError, match="feature_map must be"):
        as_feature_map("raw")
