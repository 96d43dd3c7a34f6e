"""LayerNorm with a hand-written backward pass, and the XLA:CPU fusion barrier it uses.

Why this exists: with autodiff's LayerNorm, XLA:CPU fuses the elementwise part of every
LayerNorm backward into all of its consumers *by duplication*; in a post-LN encoder the
residual-stream gradient runs through two LayerNorms per block, so each fusion re-evaluates the
elementwise chain of every block above it (fusions of 250+ ops with 100+ operands) and the
backward grows quadratically with depth. Materialising the gradient that leaves each LayerNorm
keeps the fusions per block (measured with ``benchmarks/step_bench.py``; numbers in
``benchmarks/README.md``).

``jax.lax.optimization_barrier`` does not help: XLA:CPU removes it before fusion. A
``lax.cond`` is never fused across, so :func:`cotangent_barrier` routes the cotangent through
one whose predicate is a runtime value (``anchor == anchor`` on an unbatched parameter, true
unless the parameter is NaN; the false branch returns ``g + anchor``, i.e. NaN, so no value is
ever changed). On GPU a conditional costs a device-to-host read of the predicate, so the
barrier is only used on the CPU backend by default.

The model configs choose it with their ``norm_barrier`` field (``"auto"``: on for the CPU
backend, off elsewhere; see :mod:`fedlora_jax.models.switches`), passed to
:class:`common.LayerNorm` as ``use_barrier``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def cotangent_barrier(x: Array, anchor: Array) -> Array:
    """Identity on ``x``; in the backward pass the cotangent of ``x`` is materialised behind a
    runtime ``lax.cond`` so that XLA cannot fuse (and duplicate) work across it.

    ``anchor``: a scalar that stays unbatched under ``vmap`` (a frozen parameter); under
    ``vmap`` with a batched anchor the cond becomes a select and the barrier has no effect.
    It must be a runtime value: an anchor that is a compile-time constant (a base closed over
    by ``jit`` instead of passed as an argument) lets XLA fold the cond away.
    """
    del anchor
    return x


def _barrier_fwd(x, anchor):
    return x, anchor


def _barrier_bwd(anchor, g):
    g = jax.lax.cond(anchor == anchor, lambda t: t, lambda t: t + anchor.astype(t.dtype), g)
    return g, jnp.zeros_like(anchor)


cotangent_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def _normalise(x: Array, eps: float) -> tuple[Array, Array]:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return xc * rstd, rstd


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xhat, rstd = _normalise(x, eps)
    return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    del eps
    xhat, rstd, scale = res
    gx = g * scale
    dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
                 - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    batch_axes = tuple(range(g.ndim - 1))
    return dx, jnp.sum(g * xhat, axis=batch_axes), jnp.sum(g, axis=batch_axes)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: Array, scale: Array, bias: Array, *, eps: float, barrier: bool = False) -> Array:
    """LayerNorm over the last axis in float32 with an explicit VJP; returns ``x.dtype``.

    Args:
      x: ``[..., D]``; scale, bias: ``[D]``.
      eps: variance epsilon.
      barrier: materialise the input gradient (:func:`cotangent_barrier`; see the module
        docstring).

    Same values as ``(x - mean) / sqrt(var + eps) * scale + bias`` and the same gradients as
    autodiff of that formula (tested against it), for ``x``, ``scale`` and ``bias``.
    """
    xf = x.astype(jnp.float32)
    if barrier:
        xf = cotangent_barrier(xf, jax.lax.stop_gradient(scale.reshape(-1)[0]).astype(jnp.float32))
    y = _layer_norm(xf, scale.astype(jnp.float32), bias.astype(jnp.float32), float(eps))
    return y.astype(x.dtype)
