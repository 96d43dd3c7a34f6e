"""The model-config switches for the exact CPU speed-ups of the models.

Every model config (``EncoderConfig``, ``GPT2Config``, ``LlamaConfig``) has two fields, each
``"auto"`` (default), ``"on"`` or ``"off"``:

* ``norm_barrier``: LayerNorm gradients pass a fusion barrier
  (:func:`norm_vjp.cotangent_barrier`), which stops XLA:CPU from duplicating backward work
  across layers. ``"auto"`` resolves to ``"on"`` on the CPU backend, ``"off"`` elsewhere (on
  GPU the barrier's conditional costs a device-to-host read). The encoder and GPT-2 have
  LayerNorms; Llama's RMSNorm uses autodiff, so there the field is recorded but has no effect.
* ``merged_lora``: an adapted float32 linear computes ``x @ (w + delta_w)``
  (:func:`fedlora_jax.lora.apply_merged`) instead of the base plus the low-rank path.
  ``"auto"`` resolves to ``"on"`` on the CPU backend when the config's compute ``dtype`` is
  float32, ``"off"`` otherwise. ``"on"`` still applies to float32 compute only: half precision
  always keeps the low-rank path (a small ``delta_w`` would round away in a bfloat16 kernel).

Both are exact (same values and gradients, tested); measurements are in
``benchmarks/README.md``. The model constructors resolve ``"auto"`` once
(:func:`resolve_switches`), so ``model.config`` holds the concrete ``"on"``/``"off"`` that was
used and can be recorded with a run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SWITCH_MODES = ("auto", "on", "off")
SWITCHES = ("norm_barrier", "merged_lora")


def check_switches(cfg) -> None:
    """``ValueError`` naming the field and the allowed values unless every switch of ``cfg``
    is one of :data:`SWITCH_MODES`."""
    for name in SWITCHES:
        mode = getattr(cfg, name)
        if not isinstance(mode, str) or mode not in SWITCH_MODES:
            raise ValueError(f"{type(cfg).__name__}.{name} must be one of {SWITCH_MODES}, got {mode!r}")


def resolve_switch(name: str, mode: str, dtype) -> str:
    """The concrete ``"on"``/``"off"`` of switch ``name`` set to ``mode`` for compute ``dtype``
    on the current default backend (see the module docstring)."""
    if name not in SWITCHES:
        raise ValueError(f"unknown switch {name!r}; switches: {SWITCHES}")
    if mode not in SWITCH_MODES:
        raise ValueError(f"{name} must be one of {SWITCH_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    on = jax.default_backend() == "cpu"
    if name == "merged_lora":
        on = on and jnp.dtype(dtype) == jnp.float32
    return "on" if on else "off"


def resolve_switches(cfg):
    """``cfg`` with every ``"auto"`` switch replaced by its concrete ``"on"``/``"off"`` (a new
    frozen config via ``dataclasses.replace``; ``cfg`` itself when nothing is ``"auto"``)."""
    changes = {n: resolve_switch(n, getattr(cfg, n), cfg.dtype) for n in SWITCHES if getattr(cfg, n) == "auto"}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def switch_on(cfg, name: str) -> bool:
    """Whether switch ``name`` of ``cfg`` is on (``"auto"`` resolved as :func:`resolve_switch`)."""
    return resolve_switch(name, getattr(cfg, name), cfg.dtype) == "on"
