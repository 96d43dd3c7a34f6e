"""Helpers for config modules built on another comparison's config (a setting 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_base(name: str):
    """The config module ``<name>.py`` beside this file (a setting 1 another setting builds on)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_base", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
