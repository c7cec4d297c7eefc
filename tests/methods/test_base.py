"""The method base: the lr schedule's closed form and its validation."""

from __future__ import annotations

import math

import pytest

from sqdf.errors import ConfigError
from sqdf.methods.base import MethodConfig, lr_factor


def test_cosine_schedule_closed_form():
    assert lr_factor("constant", 0.7, 0.1) == 1.0
    assert lr_factor("cosine", 0.0, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 1.0, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.5, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 0.25, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 1.5, 0.2) == pytest.approx(0.2)  # past the end: the final value


@pytest.mark.parametrize("kwargs, match", [({"lr_schedule": "step"}, "lr_schedule='step'"),
                                           ({"lr_final_fraction": 1.5}, "lr_final_fraction=1.5")])
def test_bad_schedule_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MethodConfig(**kwargs).validate()
