"""Environment switches for the exact CPU speed-ups of the models (read at trace time).

Each takes ``auto`` (default: on for the CPU backend, where it was measured faster; off
elsewhere), ``on`` or ``off``: ``FEDLORA_JAX_NORM_BARRIER`` (:mod:`norm_vjp`) and
``FEDLORA_JAX_MERGED_LORA`` (:func:`common.merged_lora_enabled`).
"""

from __future__ import annotations

import os

import jax

SWITCH_MODES = ("auto", "on", "off")


def cpu_default_switch(env_var: str) -> bool:
    """The value of the switch ``env_var``; ``ValueError`` naming it on any other value."""
    mode = os.environ.get(env_var, "auto").strip().lower()
    if mode not in SWITCH_MODES:
        raise ValueError(f"{env_var} must be one of {SWITCH_MODES}, got {mode!r}")
    if mode == "auto":
        return jax.default_backend() == "cpu"
    return mode == "on"
