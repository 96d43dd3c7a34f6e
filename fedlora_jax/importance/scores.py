"""AdaLoRA importance: sensitivity, EMA smoothing with uncertainty, triplet (rank-1) scores.

Exact AdaLoRA / PEFT ``RankAllocator.update_ipt`` and ``mask_to_budget`` semantics
(``shared/papers/fedara_legend.md`` sec. 1.3), for every element ``w`` of ``a``, ``b``, ``e``::

    I_t    = |w * dL/dw|                                  # sensitivity
    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t       # smoothed sensitivity
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|   # uncertainty (NEW Ibar)
    s_t    = Ibar_t * Ubar_t                              # element score

Triplet score of rank slot ``i`` of one module (orientation ``a: [N, R]``, ``b: [R, M]``)::

    S_i = s(e_i) + mean_N s(a[:, i]) + mean_M s(b[i, :])

Without ``e`` (plain LoRA) the first term is absent: this is HAFL's rank-1 component score
(``shared/papers/aggregation.md`` sec. 2.2). All scores are float32 whatever the storage dtype.
Every function is pure and jittable and works on trees of :class:`~fedlora_jax.lora.LoraFactors`
with any leading (client) axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.lora import LoraFactors

Array = jax.Array
PyTree = Any


class EmaState(NamedTuple):
    """AdaLoRA EMA state, same tree structure as the parameters.

    Attributes:
      ibar: smoothed sensitivity ``Ibar`` (float32 tree).
      ubar: smoothed uncertainty ``Ubar`` (float32 tree).
    """

    ibar: PyTree
    ubar: PyTree


def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_beta(name: str, beta: float) -> None:
    if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {beta!r}")


def sensitivity(params: PyTree, grads: PyTree) -> PyTree:
    """Element-wise sensitivity ``|w * g|`` in float32.

    Args:
      params: a tree (e.g. a ``LoraTree``), leaves any shape.
      grads: the gradient tree, same structure and shapes.

    Returns:
      Tree of float32 ``|params * grads|``.
    """
    if jax.tree.structure(params) != jax.tree.structure(grads):
        raise ValueError("params and grads must have the same tree structure, got "
                         f"{jax.tree.structure(params)} and {jax.tree.structure(grads)}")
    return jax.tree.map(lambda w, g: jnp.abs(_f32(w) * _f32(g)), params, grads)


def ema_init(tree: PyTree) -> EmaState:
    """Zero EMA state (float32) with the structure and shapes of ``tree``."""
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)
    return EmaState(zeros, zeros)


def ema_update(state: EmaState, sens: PyTree, *, beta1: float = 0.85, beta2: float = 0.85,
               uncertainty: bool = True) -> EmaState:
    """One AdaLoRA EMA step (PEFT ``RankAllocator.update_ipt``).

    ``Ibar`` is updated first and ``Ubar`` uses the UPDATED ``Ibar``.

    Args:
      state: previous :class:`EmaState`.
      sens: sensitivity tree from :func:`sensitivity`.
      beta1: EMA factor of the sensitivity.
      beta2: EMA factor of the uncertainty.
      uncertainty: if False, ``Ubar`` is left unchanged (HAFL's simplified option, where the
        score is ``Ibar`` alone; see :func:`element_scores`).

    Returns:
      The new :class:`EmaState`.
    """
    _check_beta("beta1", beta1)
    _check_beta("beta2", beta2)
    ibar = jax.tree.map(lambda i, s: beta1 * i + (1.0 - beta1) * _f32(s), state.ibar, sens)
    if not uncertainty:
        return EmaState(ibar, state.ubar)
    ubar = jax.tree.map(lambda u, s, i: beta2 * u + (1.0 - beta2) * jnp.abs(_f32(s) - i),
                        state.ubar, sens, ibar)
    return EmaState(ibar, ubar)


def element_scores(state: EmaState, *, uncertainty: bool = True) -> PyTree:
    """Element scores ``s = Ibar * Ubar`` (or ``Ibar`` alone with ``uncertainty=False``)."""
    if not uncertainty:
        return state.ibar
    return jax.tree.map(lambda i, u: i * u, state.ibar, state.ubar)


def triplet_score(score: LoraFactors) -> Array:
    """Rank-slot score of one module: ``s(e) + mean_N s(a) + mean_M s(b)``.

    Args:
      score: element scores shaped like the factors: ``a [..., N, R]``, ``b [..., R, M]``,
        ``e [..., R]`` or ``None``.

    Returns:
      ``[..., R]`` float32.
    """
    out = jnp.mean(_f32(score.a), axis=-2) + jnp.mean(_f32(score.b), axis=-1)
    if score.e is not None:
        out = out + _f32(score.e)
    return out


def triplet_scores(score_tree: Mapping[str, LoraFactors]) -> dict[str, Array]:
    """:func:`triplet_score` for every module of a tree: ``{key: [..., R]}``."""
    out = {}
    for k, f in score_tree.items():
        if not isinstance(f, LoraFactors):
            raise TypeError(f"score_tree[{k!r}]: expected LoraFactors, got {type(f).__name__}")
        out[k] = triplet_score(f)
    return out
