"""Shared test fixtures: float64 mode on demand, tolerances written down once per dtype."""

import pytest

from fedlora_jax.testing import float64_enabled

# Tolerances per dtype, used across the suite (absolute, relative).
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2), "float64": (1e-10, 1e-10)}


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting afterwards."""
    with float64_enabled():
        yield
