"""AdaLoRA's cubic budget schedule and global / per-client top-k rank masks.

Schedule (PEFT ``RankAllocator.budget_schedule``, ``shared/papers/fedara_legend.md`` sec. 1.3),
with ``t`` a step or (FedARA) a round index::

    t <= t_init                 -> (b0, False)                 warm-up, no masking
    t >  total - t_final        -> (b_final, True)             final phase, mask every time
    otherwise                   -> (floor((b0 - b_final) * (1 - (t - t_init) /
                                   (total - t_final - t_init))**3 + b_final),
                                    t % mask_interval == 0)

Top-k: scores are ranked by a STABLE descending sort, so among equal scores the lower
flat index wins (flat index = position in the concatenation, over sorted module keys, of
each module's ``R`` slots). The budget may be a traced integer array: masks come from rank
comparisons, never from dynamic shapes. NaN scores rank as ``-inf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class BudgetSchedule(NamedTuple):
    """Static hyperparameters of :func:`budget_schedule` (``schedule(t)`` calls it)."""

    b0: int
    b_final: int
    t_init: int
    t_final: int
    total: int
    mask_interval: int = 1

    def __call__(self, t):
        return budget_schedule(t, **self._asdict())


def _is_py_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def budget_schedule(t, *, b0: int, b_final: int, t_init: int, t_final: int, total: int,
                    mask_interval: int = 1):
    """Cubic budget ``b(t)`` and whether to re-allocate masks at ``t``.

    Args:
      t: step / round index: a Python int, or an int array (traced is fine).
      b0: initial budget (number of rank slots kept), e.g. ``sum_m r0``.
      b_final: final budget ``b_T``.
      t_init: warm-up length (no masking while ``t <= t_init``).
      t_final: length of the final phase (``t > total - t_final``).
      total: total number of steps / rounds ``T``.
      mask_interval: ``Delta T``: re-allocate every ``mask_interval`` steps in the middle phase.

    Returns:
      ``(budget, allocate_now)``: Python ``(int, bool)`` for a Python ``t`` (bit-exact PEFT,
      float64 arithmetic); int32 / bool arrays for an array ``t`` (same formula in the default
      float dtype; float32 may differ from PEFT by one slot when the cubic term lands within
      float32 rounding of an integer).

    Raises:
      ValueError: if the hyperparameters are inconsistent.
    """
    for name, v in (("b0", b0), ("b_final", b_final), ("t_init", t_init), ("t_final", t_final),
                    ("total", total), ("mask_interval", mask_interval)):
        if not _is_py_int(v) or v < 0:
            raise ValueError(f"{name} must be a Python int >= 0, got {v!r}")
    if mask_interval < 1:
        raise ValueError(f"mask_interval must be >= 1, got {mask_interval}")
    if b_final > b0:
        raise ValueError(f"b_final={b_final} must be <= b0={b0}")
    span = total - t_final - t_init
    if span <= 0:
        raise ValueError(f"total - t_final - t_init must be > 0, got total={total}, "
                         f"t_final={t_final}, t_init={t_init}")
    if _is_py_int(t):
        t = int(t)
        if t <= t_init:
            return b0, False
        if t > total - t_final:
            return b_final, True
        mul = 1 - (t - t_init) / span
        return int((b0 - b_final) * (mul ** 3) + b_final), t % mask_interval == 0
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must be an integer (Python int or int array), got dtype {t.dtype}")
    tf = t.astype(jnp.result_type(float))
    mul = 1.0 - (tf - t_init) / span
    mid = jnp.floor((b0 - b_final) * mul ** 3 + b_final).astype(jnp.int32)
    warm = t <= t_init
    final = t > total - t_final
    budget = jnp.where(warm, b0, jnp.where(final, b_final, mid)).astype(jnp.int32)
    alloc = jnp.where(warm, False, jnp.where(final, True, t % mask_interval == 0))
    return budget, alloc


def _stable_rank_desc(s: Array) -> Array:
    """Rank of each entry along the last axis in a stable descending order (0 = best)."""
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    order = jnp.argsort(s, axis=-1, stable=True, descending=True)
    return jnp.argsort(order, axis=-1, stable=True)


def _check_budget(budget, total: int) -> Array:
    if _is_py_int(budget) and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    b = jnp.asarray(budget)
    if not jnp.issubdtype(b.dtype, jnp.integer):
        raise TypeError(f"budget must be an integer (Python int or int array), got {b.dtype}")
    return b


def topk_masks(scores: Mapping[str, Array], budget, *, prev_masks: Mapping[str, Array] | None = None,
               nested: bool = True, dtype=jnp.float32) -> dict[str, Array]:
    """Global top-``budget`` rank slots across all modules, as 0/1 masks.

    Args:
      scores: ``{key: [..., R]}`` slot scores (e.g. :func:`triplet_scores`); all leaves share
        the leading shape ``...`` (e.g. ``[C]`` gives an independent top-k per client).
      budget: number of slots to keep: int or int array broadcastable to ``...`` (traced OK).
      prev_masks: previous masks ``{key: [..., R]}``, used when ``nested``.
      nested: if True (FedARA, monotone), slots inactive in ``prev_masks`` get score ``-inf``
        and are never revived: the result is ``prev & top-k``, so at most ``budget`` slots and
        never more than were active. If False (AdaLoRA, reviving), ``prev_masks`` is ignored.
      dtype: dtype of the returned masks.

    Returns:
      ``{key: [..., R]}`` masks in {0, 1}. Ties: the lower flat index (sorted keys, then slot)
      wins, so exactly ``min(budget, #candidates)`` slots are kept.
    """
    if not scores:
        raise ValueError("scores is empty")
    keys = sorted(scores)
    lead = jnp.shape(scores[keys[0]])[:-1]
    for k in keys:
        if jnp.shape(scores[k])[:-1] != lead:
            raise ValueError(f"scores[{k!r}] has shape {jnp.shape(scores[k])}, expected leading "
                             f"shape {lead} like scores[{keys[0]!r}]")
    sizes = [jnp.shape(scores[k])[-1] for k in keys]
    flat = jnp.concatenate([jnp.asarray(scores[k]).astype(jnp.float32) for k in keys], axis=-1)
    b = _check_budget(budget, flat.shape[-1])
    prev = None
    if nested and prev_masks is not None:
        missing = set(keys) - set(prev_masks)
        if missing:
            raise ValueError(f"prev_masks lacks modules {sorted(missing)}")
        prev = jnp.concatenate([jnp.broadcast_to(jnp.asarray(prev_masks[k]) != 0,
                                                 jnp.shape(scores[k])) for k in keys], axis=-1)
        flat = jnp.where(prev, flat, -jnp.inf)
    keep = _stable_rank_desc(flat) < jnp.expand_dims(b, -1)
    if prev is not None:
        keep = keep & prev
    keep = keep.astype(dtype)
    out, start = {}, 0
    for k, n in zip(keys, sizes, strict=True):
        out[k] = keep[..., start:start + n]
        start += n
    return out


def per_client_topk(scores, k, *, dtype=jnp.float32):
    """Top-``k`` slots of each module separately (HAFL: a client's ``r_k`` best components).

    Args:
      scores: ``[..., R]`` array, or ``{key: [..., R]}``.
      k: int or int array broadcastable to ``...`` (e.g. ``[C]`` for scores ``[C, R]``);
        traced OK. Values above ``R`` keep everything, below 0 keep nothing.
      dtype: dtype of the returned masks.

    Returns:
      Masks shaped like ``scores``; exactly ``clip(k, 0, R)`` ones per module; ties to the
      lower slot index.
    """
    if isinstance(scores, Mapping):
        return {key: per_client_topk(v, k, dtype=dtype) for key, v in scores.items()}
    s = jnp.asarray(scores).astype(jnp.float32)
    kk = _check_budget(k, s.shape[-1])
    return (_stable_rank_desc(s) < jnp.expand_dims(kk, -1)).astype(dtype)
