"""Fixtures of the black-box tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def counted(monkeypatch):
    """Counts every sample the oracle asks its hidden true reward about (evaluations do not go through it)."""
    from sqdf.blackbox.oracle import Oracle

    calls = {"n": 0}
    original = Oracle._ask

    def counting(self, x, cond=None):
        calls["n"] += x.shape[0]
        return original(self, x, cond)

    monkeypatch.setattr(Oracle, "_ask", counting)
    return calls
