"""Helpers for config modules built on another comparison's config (a setting 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: The accuracy margin of the comparisons evaluated on the first 1,000 AG News test articles
#: (declared 2026-12-06, issue 32).
ACCURACY_MARGIN_1000 = {"delta": 0.01, "reason": "one point of accuracy: one arm's accuracy on the 1,000 test "
                        "articles has a binomial standard error of 0.011-0.016 (at accuracies 0.85-0.5), so a "
                        "smaller difference is below what one evaluation resolves"}


def load_base(name: str):
    """The config module ``<name>.py`` beside this file (a setting 1 another setting builds on)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_base", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
