"""The model-config switches for the exact CPU speed-ups of the models.

Every model config (``EncoderConfig``, ``GPT2Config``, ``LlamaConfig``) has two fields, each
``"auto"`` (default), ``"on"`` or ``"off"``:

* ``norm_barrier``: LayerNorm gradients pass a fusion barrier
  (:func:`norm_vjp.cotangent_barrier`), which stops XLA:CPU from duplicating backward work
  across layers. ``"auto"`` resolves to ``"on"`` on the CPU backend, ``"off"`` elsewhere (on
  GPU the barrier's conditional costs a device-to-host read). The encoder and GPT-2 have
  LayerNorms; Llama's RMSNorm uses autodiff, so there ``"auto"`` resolves to ``"off"`` and
  ``"on"`` is refused (it would be ignored).
* ``merged_lora``: an adapted float32 linear computes ``x @ (w + delta_w)``
  (:func:`fedlora_jax.lora.apply_merged`) instead of the base plus the low-rank path.
  ``"auto"`` resolves to ``"on"`` on the CPU backend when the config's compute ``dtype`` is
  float32, ``"off"`` otherwise. ``"on"`` with half-precision compute is refused: half precision
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


def resolve_switch(name: str, mode: str, dtype, *, applies: bool = True) -> str:
    """The concrete ``"on"``/``"off"`` of switch ``name`` set to ``mode`` for compute ``dtype``
    on the current default backend (see the module docstring). ``applies=False``: the model has
    nothing the switch acts on (Llama's norm barrier).

    Raises:
      ValueError: an unknown mode, or ``"on"`` where it would be ignored.
    """
    if name not in SWITCHES:
        raise ValueError(f"unknown switch {name!r}; switches: {SWITCHES}")
    if mode not in SWITCH_MODES:
        raise ValueError(f"{name} must be one of {SWITCH_MODES}, got {mode!r}")
    usable = applies and (name != "merged_lora" or jnp.dtype(dtype) == jnp.float32)
    if mode == "on" and not usable:
        why = (f"compute dtype {jnp.dtype(dtype).name} keeps the low-rank path" if applies
               else "this model has no LayerNorm to put the barrier on")
        raise ValueError(f"{name}='on' would be ignored: {why}; use 'auto' or 'off'")
    if mode != "auto":
        return mode
    return "on" if usable and jax.default_backend() == "cpu" else "off"


def resolve_switches(cfg):
    """``cfg`` with every ``"auto"`` switch replaced by its concrete ``"on"``/``"off"`` (a new
    frozen config via ``dataclasses.replace``; ``cfg`` itself when nothing is ``"auto"``)."""
    changes = {n: resolve_switch(n, getattr(cfg, n), cfg.dtype, applies=_applies(cfg, n)) for n in SWITCHES}
    changes = {n: v for n, v in changes.items() if v != getattr(cfg, n)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _applies(cfg, name: str) -> bool:
    return name != "norm_barrier" or getattr(cfg, "has_layer_norm", True)


def switch_on(cfg, name: str) -> bool:
    """Whether switch ``name`` of ``cfg`` is on (``"auto"`` resolved as :func:`resolve_switch`)."""
    return resolve_switch(name, getattr(cfg, name), cfg.dtype, applies=_applies(cfg, name)) == "on"
