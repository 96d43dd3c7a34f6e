"""Shared server math: weight normalisation, masked clean-up, the per-slot weighted mean (R).

All functions work on ONE module's arrays with the client axis ``C`` leading:
``a [C, ..., N, R]``, ``b [C, ..., R, M]``, ``e [C, ..., R]``, ``m [C, ..., R]``, ``p [C]``.
Compute dtype is ``promote(storage, float32)`` (bf16 -> f32, f64 stays f64 for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.lora import LoraFactors

Array = jax.Array


def compute_dtype(x: Array):
    """``promote_types(x.dtype, float32)``: the server math dtype."""
    return jnp.promote_types(x.dtype, jnp.float32)


def up(x: Array | None, like: Array | None = None) -> Array | None:
    """Upcast to the compute dtype of ``like`` (default ``x``)."""
    if x is None:
        return None
    return x.astype(compute_dtype(x if like is None else like))


def normalize(weights: Array) -> tuple[Array, Array]:
    """Raw weights ``[C]`` -> (``p [C]`` summing to 1, ``valid`` scalar bool ``sum > 0``).

    When all weights are zero ``p`` is all zeros (the caller keeps the previous global).
    """
    w = jnp.asarray(weights)
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    total = jnp.sum(w)
    valid = total > 0
    return w / jnp.where(valid, total, 1.0), valid


def bcast(p: Array, like: Array) -> Array:
    """``p [C]`` reshaped to broadcast against ``like [C, ...]``."""
    return p.reshape(p.shape + (1,) * (like.ndim - 1))


def binary(m: Array, dtype) -> Array:
    """Mask as exact {0, 1} in ``dtype`` (any non-zero counts as active)."""
    return (m != 0).astype(dtype)


def clean(x: Array, keep: Array, p: Array) -> Array:
    """Zero masked-out entries (``keep == 0``) with ``where`` (garbage and NaN never leak),
    and sanitize non-finite values of zero-weight clients (``p [C]`` broadcastable)."""
    x = jnp.where(keep != 0, x, jnp.zeros((), x.dtype))
    safe = jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return jnp.where(bcast(p, x) > 0, x, safe)


def slot_axes(part: str, w_slot: Array) -> Array:
    """Expand per-slot weights ``[C, ..., R]`` to broadcast with factor ``part``."""
    if part == "a":
        return w_slot[..., None, :]
    if part == "b":
        return w_slot[..., :, None]
    return w_slot


def slot_mean(x: Array, w_slot: Array, prev: Array, part: str, *, renorm: bool,
              p: Array) -> Array:
    """Primitive (R) of the spec for one factor.

    ``out[..., i] = sum_k w[k, i] x_k[..., i] / den_i`` where ``den_i = sum_k w[k, i]``
    (``renorm=True``: replication padding / HAFL) or ``den_i = 1`` (``renorm=False``:
    zero padding with weights already normalised over ``C``). Slots with
    ``sum_k w[k, i] == 0`` keep ``prev``. Output in ``prev.dtype``.

    Args:
      x: client factor ``[C, ...]`` (``a``, ``b`` or ``e`` layout, see ``part``).
      w_slot: ``[C, ..., R]`` non-negative per-client, per-slot weights (zero where masked).
      prev: previous global factor (no ``C``).
      part: ``"a"``, ``"b"`` or ``"e"``.
      renorm: per-slot renormalisation.
      p: ``[C]`` client weights used to sanitize zero-weight clients.
    """
    cd = compute_dtype(x)
    w_slot = w_slot.astype(cd)
    we = slot_axes(part, w_slot)
    xc = clean(x.astype(cd), we, p)
    num = jnp.sum(we * xc, axis=0)
    den_slot = jnp.sum(w_slot, axis=0)
    owned = den_slot > 0
    den = slot_axes(part, den_slot[None])[0] if renorm else jnp.ones((), cd)
    safe_den = jnp.where(slot_axes(part, owned[None])[0], den, 1.0) if renorm else den
    out = jnp.where(slot_axes(part, owned[None])[0], num / safe_den, prev.astype(cd))
    return out.astype(prev.dtype)


def factor_mean(g: LoraFactors, f: LoraFactors, w_slot: Array, *, renorm: bool, p: Array,
                parts=("a", "b", "e")) -> LoraFactors:
    """:func:`slot_mean` on each factor in ``parts``; other factors keep the global's value."""
    a = slot_mean(f.a, w_slot, g.a, "a", renorm=renorm, p=p) if "a" in parts else g.a
    b = slot_mean(f.b, w_slot, g.b, "b", renorm=renorm, p=p) if "b" in parts else g.b
    e = g.e
    if g.e is not None and "e" in parts:
        e = slot_mean(f.e, w_slot, g.e, "e", renorm=renorm, p=p)
    return LoraFactors(a, b, e)


def client_gain(f: LoraFactors, m: Array, p: Array) -> Array:
    """Per-client gain ``m_k * e_k`` (or ``m_k``), cleaned, compute dtype, ``[C, ..., R]``."""
    cd = compute_dtype(f.a)
    mb = binary(m, cd)
    if f.e is None:
        return mb
    return clean(f.e.astype(cd), mb, p) * mb


def weighted_product_sum(f: LoraFactors, m: Array, p: Array) -> Array:
    """``sum_k p_k a_k diag(m_k e_k) b_k`` (no scale), ``[..., N, M]`` in compute dtype.

    Masked-out slots (and zero-weight clients' non-finite values) never contribute.
    """
    cd = compute_dtype(f.a)
    mb = binary(m, cd)
    gain = client_gain(f, m, p) * bcast(p.astype(cd), mb)
    a = clean(f.a.astype(cd), mb[..., None, :], p) * gain[..., None, :]
    b = clean(f.b.astype(cd), mb[..., :, None], p)
    return jnp.einsum("c...nr,c...rm->...nm", a, b)


def global_product(g: LoraFactors, mask: Array | None = None) -> Array:
    """``a diag(mask * e) b`` of the global factors (no scale), compute dtype."""
    cd = compute_dtype(g.a)
    a = g.a.astype(cd)
    gain = None if g.e is None else g.e.astype(cd)
    if mask is not None:
        mb = binary(mask, cd)
        gain = mb if gain is None else gain * mb
    if gain is not None:
        a = a * gain[..., None, :]
    return a @ g.b.astype(cd)


def keep_if(valid: Array, new: LoraFactors, old: LoraFactors) -> LoraFactors:
    """``new`` where ``valid`` else ``old`` (all-zero weights keep the previous global)."""
    return jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, old)


def truncate(g: LoraFactors, mask: Array) -> LoraFactors:
    """Prefix/arbitrary-mask truncation of the global for one client (exact zeros)."""
    keep = mask != 0
    z = lambda x: jnp.zeros((), x.dtype)
    a = jnp.where(keep[..., None, :], g.a, z(g.a))
    b = jnp.where(keep[..., :, None], g.b, z(g.b))
    e = None if g.e is None else jnp.where(keep, g.e, z(g.e))
    return LoraFactors(a, b, e)
