"""Mixed padding: a differentiable interpolation between zero and replication padding.

Zero padding (FedIT / HetLoRA, spec 3.1) and replication padding (Byun & Lee, REP-MEAN) are
the two ends of one formula. With ``w[k, i] = p_k s[k, i] m_k[i]`` (client weight, optional
per-client per-slot weight, mask) and ``P_i = sum_k w[k, i]``::

    num_i = sum_k w[k, i] x_k[..., i]
    out_i = num_i * ((1 - g_i) + g_i / P_i)          (g_i = pad_mix of slot i, in [0, 1])

``g_i = 0`` is zero padding (the owners' sum, diluted by the clients that do not own slot
``i``), ``g_i = 1`` is replication padding (the owners' mean). Slots no client owns keep the
previous global. Everything is a smooth function of ``p``, ``s`` and ``g``, so these
*server hyperparameters* can be learned by ``jax.grad`` through whole rounds
(:mod:`fedlora_jax.federated.hypergrad`): pass them as arrays, per round, in
``extras["hyper"]`` (a :class:`PaddingHyper`); without it the factory's static ``pad_mix``
is used and the per-slot weights are 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import _common as cm
from fedlora_jax.aggregation.base import Aggregator, EmptyState, check_inputs, check_mapping, register
from fedlora_jax.aggregation.padding import _data_slot_weights, _distribute_truncate
from fedlora_jax.lora import LoraFactors

Array = jax.Array


class PaddingHyper(NamedTuple):
    """Arrays of one mixed-padding aggregation (differentiable server hyperparameters).

    Attributes:
      pad_mix: ``g``, broadcastable to each module's ``[..., R]`` (a scalar, ``[R]``), or a
        ``{key: array}`` dict for per-module values. 0 = zero padding, 1 = replication padding.
        Not clipped: keep it in ``[0, 1]`` (e.g. ``jax.nn.sigmoid`` of a logit).
      slot_weight: per-client per-slot (rank-1) weights ``s >= 0`` broadcastable to
        ``[C, ..., R]`` (e.g. ``[C, R]`` or ``[C, 1]``), a ``{key: array}`` dict, or ``None``
        (all ones). Multiplies ``p_k m_k[i]``: HAFL-style rank-1 weighting, learned.
    """

    pad_mix: Any = None
    slot_weight: Any = None


def _for_key(value, key: str, what: str):
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(f"PaddingHyper.{what} has no entry for module {key!r} (has {sorted(value)})")
        return value[key]
    return value


def _slot_weight(s, m: Array, cd) -> Array:
    """``s`` broadcast to the mask's ``[C, ..., R]``; a ``[C, R]`` array meets modules with lead
    axes ``[C, ..., R]`` by inserting the middle axes."""
    s = jnp.asarray(s, cd)
    if 1 < s.ndim < m.ndim:
        s = s.reshape(s.shape[:1] + (1,) * (m.ndim - s.ndim) + s.shape[1:])
    return jnp.broadcast_to(s, m.shape)


def _mixed_mean(x: Array, w_slot: Array, prev: Array, part: str, g: Array, p: Array) -> Array:
    """``num * ((1 - g) + g / P)`` per slot for one factor; unowned slots keep ``prev``."""
    cd = cm.compute_dtype(x)
    we = cm.slot_axes(part, w_slot)
    num = jnp.sum(we * cm.clean(x.astype(cd), we, p), axis=0)
    den = jnp.sum(w_slot, axis=0)                              # P_i, [..., R]
    owned = den > 0
    gain = (1.0 - g) + g / jnp.where(owned, den, 1.0)
    out = num * cm.slot_axes(part, gain[None])[0]
    return jnp.where(cm.slot_axes(part, owned[None])[0], out, prev.astype(cd)).astype(prev.dtype)


@register("mixed_padding")
def mixed_padding(*, pad_mix: float = 1.0) -> Aggregator:
    """Zero padding (``pad_mix=0``) to replication padding (``pad_mix=1``), differentiably.

    ``out_i = sum_k w[k, i] x_k[i] * ((1 - g_i) + g_i / sum_k w[k, i])`` with
    ``w[k, i] = p_k s[k, i] m_k[i]`` (module docstring). ``pad_mix``: the static ``g`` used
    when the round passes no ``extras["hyper"]``; a :class:`PaddingHyper` there overrides it
    (its ``None`` fields fall back to ``pad_mix`` and ``s = 1``). ``pad_mix=1`` equals
    ``replication_padding()``, ``pad_mix=0`` equals ``fedit()`` (tested). Distribution:
    prefix truncation. Slots no client owns keep the previous global.
    """
    if not (isinstance(pad_mix, int | float) and not isinstance(pad_mix, bool) and 0.0 <= pad_mix <= 1.0):
        raise ValueError(f"pad_mix must be a number in [0, 1], got {pad_mix!r}")
    static_g = float(pad_mix)

    def init(global_lora):
        del global_lora
        return EmptyState()

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        extras = check_mapping(extras)
        hyper = extras.get("hyper")
        if hyper is not None and not isinstance(hyper, PaddingHyper):
            raise TypeError(f"mixed_padding reads extras['hyper'] as a PaddingHyper, got {type(hyper).__name__}")
        hyper = PaddingHyper() if hyper is None else hyper
        p, valid = cm.normalize(weights)
        out = {}
        for k, gl in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            w_slot = _data_slot_weights(k, gl, f, m, p, extras)          # p_k m_k[i]
            if hyper.slot_weight is not None:
                w_slot = w_slot * _slot_weight(_for_key(hyper.slot_weight, k, "slot_weight"), m, cd)
            g = static_g if hyper.pad_mix is None else _for_key(hyper.pad_mix, k, "pad_mix")
            g = jnp.broadcast_to(jnp.asarray(g, cd), m.shape[1:])
            a = _mixed_mean(f.a, w_slot, gl.a, "a", g, p)
            b = _mixed_mean(f.b, w_slot, gl.b, "b", g, p)
            e = None if gl.e is None else _mixed_mean(f.e, w_slot, gl.e, "e", g, p)
            out[k] = cm.keep_if(valid, LoraFactors(a, b, e), gl)
        return out, state

    return Aggregator(init, aggregate, _distribute_truncate, ("a", "b", "e"), ("a", "b", "e"), "mixed_padding",
                      reads_hyper=True)
