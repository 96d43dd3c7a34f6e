"""Rank rules: FedARA allocation and pruning, HAFL truncation/freezing, prefix (HetLoRA) masks.

Pure and jittable (masks are arrays, ranks may be traced). Specs:
``shared/papers/fedara_legend.md`` sec. 1.2-1.4 (FedARA) and ``shared/papers/aggregation.md``
sec. 2 (HAFL). Orientation: ``a [..., N, R]`` (= AdaLoRA ``Q^T``), ``b [..., R, M]``
(= ``P^T``), ``e [..., R]`` (= ``lambda``); masks ``[..., R]`` in {0, 1}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax import lora
from fedlora_jax.importance import per_client_topk, topk_masks
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

Array = jax.Array

_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)(?:\.|$)")


# ------------------------------------------------------------------------------- FedARA


def svd_adapter_init(key: Array, shapes: Mapping[str, tuple[int, int]], r_max: int, *,
                     std: float = 0.02, dtype=jnp.float32) -> LoraTree:
    """AdaLoRA / FedARA init: ``e = 0``; ``a, b ~ N(0, std^2)``, so ``delta_w = 0``.

    Args:
      key: typed PRNG key.
      shapes: ``{key: (N, M)}``.
      r_max: static ``R`` (AdaLoRA ``init_r``).
      std: standard deviation of ``a`` and ``b`` (AdaLoRA 0.02).
      dtype: storage dtype.
    """
    return lora.init(key, shapes, r_max, scheme="svd_form", std=std, dtype=dtype)


def _safe_fro(x: Array) -> Array:
    """Frobenius norm over the last two axes with a finite (zero) gradient at 0."""
    sq = jnp.sum(x * x, axis=(-2, -1))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


ORTH_FORMS = ("fro", "fro_sq")


def orth_penalty(factors: LoraFactors, mask: Array | None = None, *, form: str = "fro") -> tuple[Array, Array]:
    """Orthogonality terms of one module: ``||(Q Q^T - I) * zz^T||_F``, ``||(P^T P - I) * zz^T||_F``.

    With ``Q = a^T`` (``Q Q^T = a^T a``) and ``P = b^T`` (``P^T P = b b^T``), both ``[R, R]``.
    ``form="fro"`` (PEFT / AdaLoRA) is the plain norm; ``"fro_sq"`` its square, whose gradient
    vanishes as ``P`` and ``Q`` approach orthonormality.

    Returns:
      ``(q_term, p_term)``, each ``[...]`` float32.
    """
    if form not in ORTH_FORMS:
        raise ValueError(f"form must be one of {ORTH_FORMS}, got {form!r}")
    a = factors.a.astype(jnp.float32)
    b = factors.b.astype(jnp.float32)
    r = a.shape[-1]
    eye = jnp.eye(r, dtype=jnp.float32)
    qq = jnp.swapaxes(a, -1, -2) @ a - eye
    pp = b @ jnp.swapaxes(b, -1, -2) - eye
    if mask is not None:
        z = mask.astype(jnp.float32)
        zz = z[..., :, None] * z[..., None, :]
        qq, pp = qq * zz, pp * zz
    if form == "fro_sq":
        return jnp.sum(qq * qq, axis=(-2, -1)), jnp.sum(pp * pp, axis=(-2, -1))
    return _safe_fro(qq), _safe_fro(pp)


def orth_regularizer(lora_tree: LoraTree, masks: MaskTree | None = None, *,
                     count: str = "active", form: str = "fro") -> Array:
    """AdaLoRA orthogonality regulariser (PEFT ``AdaLoraModel.forward``, plain Frobenius).

    ``R = (1 / n_matrices) * sum_modules ||(QQ^T - I) * zz^T||_F + ||(P^TP - I) * zz^T||_F``

    Args:
      lora_tree: ``{key: LoraFactors}``, leaves ``[..., N, R]`` / ``[..., R, M]``.
      masks: ``{key: [..., R]}`` or ``None`` (all slots active = PEFT).
      count: ``"active"`` (default; FedARA removes pruned modules, so only modules with at
        least one active slot count, two matrices each) or ``"all"`` (every module counts,
        as PEFT with all modules present).
      form: ``"fro"`` (plain norm, PEFT) or ``"fro_sq"`` (squared), see :func:`orth_penalty`.

    Returns:
      ``[...]`` float32 (a scalar for an unstacked tree). Gradient is finite everywhere.
    """
    if count not in ("active", "all"):
        raise ValueError(f"count must be 'active' or 'all', got {count!r}")
    total, n = 0.0, 0.0
    for k, f in lora_tree.items():
        m = None if masks is None else masks[k]
        q, p = orth_penalty(f, m, form=form)
        total = total + q + p
        if count == "all" or m is None:
            n = n + 2.0
        else:
            n = n + 2.0 * jnp.any(m != 0, axis=-1).astype(jnp.float32)
    return total / jnp.maximum(n, 1.0)


def active_modules(masks: MaskTree, r_min: int = 1) -> dict[str, Array]:
    """``{key: [...] bool}``: a module is active when it has at least ``r_min`` active slots."""
    return {k: jnp.sum(m != 0, axis=-1) >= r_min for k, m in masks.items()}


def layer_of(key: str) -> int:
    """Layer index parsed from a key like ``"layer.3.query"`` (``ValueError`` if absent)."""
    found = _LAYER_RE.search(key)
    if found is None:
        raise ValueError(f"cannot find 'layer.<i>' in module key {key!r}; pass layer_of_key")
    return int(found.group(1))


def lowest_active_layer(masks: MaskTree, layer_of_key: Mapping[str, int] | None = None, *,
                        num_layers: int | None = None, r_min: int = 1) -> Array:
    """Lowest layer holding an active module: the ``grad_cut_layer`` for the round.

    Args:
      masks: ``{key: [..., R]}``.
      layer_of_key: ``{key: layer}``; default parses ``"layer.<i>"`` from each key.
      num_layers: value returned where no module is active (default: ``max layer + 1``).
      r_min: activity threshold (see :func:`active_modules`).

    Returns:
      int32 ``[...]``.
    """
    layers = {k: (layer_of_key[k] if layer_of_key is not None else layer_of(k)) for k in masks}
    none = max(layers.values()) + 1 if num_layers is None else num_layers
    act = active_modules(masks, r_min)
    out = None
    for k in sorted(masks):
        cand = jnp.where(act[k], layers[k], none).astype(jnp.int32)
        out = cand if out is None else jnp.minimum(out, cand)
    return out


def prune_modules(masks: MaskTree, r_min: int) -> MaskTree:
    """Zero every module with fewer than ``r_min`` active slots (FedARA's optional variant)."""
    act = active_modules(masks, r_min)
    return {k: m * act[k][..., None].astype(m.dtype) for k, m in masks.items()}


def fedara_allocate(masks: MaskTree, agg_scores: Mapping[str, Array], round_idx,
                    schedule: Callable, *, r_min: int = 1, nested: bool = True) -> MaskTree:
    """FedARA server rank allocation (monotone, nested), spec sec. 1.4 step 2-3.

    ``z <- z & TopB(S, b(t))`` if the schedule says so at ``round_idx``, else ``z``; then
    modules with fewer than ``r_min`` active slots are pruned (``r_min=1``: a no-op).

    Args:
      masks: current global masks ``{key: [R]}``.
      agg_scores: aggregated triplet scores ``{key: [R]}`` from the previous round.
      round_idx: int or traced int array.
      schedule: ``t -> (budget, allocate_now)``, e.g. :class:`fedlora_jax.importance.BudgetSchedule`.
      r_min: module pruning threshold.
      nested: True (FedARA, monotone: a pruned triplet never returns); False = AdaLoRA's
        rule (global top-k over all triplets each time; a triplet can revive when its score,
        from unmasked training, rises again: ``algorithms.adalora``).

    Returns:
      New masks, ``new <= masks`` element-wise.
    """
    budget, now = schedule(round_idx)
    new = topk_masks(agg_scores, budget, prev_masks=masks, nested=nested)
    out = {k: jnp.where(now, new[k].astype(m.dtype), m) for k, m in masks.items()}
    return prune_modules(out, r_min) if r_min > 1 else out


# --------------------------------------------------------------------------------- HAFL


class HaflMasks(NamedTuple):
    """HAFL freezing masks per client.

    Attributes:
      forward: ``{key: [C, R]}`` all ones (every client uses the full global adapter).
      update: ``{key: [C, R]}`` the slots the client trains and sends.
    """

    forward: MaskTree
    update: MaskTree


def _ranks_array(ranks, r_max: int) -> Array:
    r = jnp.asarray(ranks)
    if not jnp.issubdtype(r.dtype, jnp.integer):
        raise TypeError(f"ranks must be integers, got dtype {r.dtype}")
    if r.ndim != 1:
        raise ValueError(f"ranks must have shape [C], got {r.shape}")
    if not isinstance(r, jax.core.Tracer):
        if int(jnp.min(r)) < 0 or int(jnp.max(r)) > r_max:
            raise ValueError(f"ranks must lie in [0, r_max={r_max}], got {r.tolist()}")
    return r


def hafl_truncation_masks(global_scores: Mapping[str, Array], ranks) -> MaskTree:
    """HAFL importance-based truncation: client ``k`` gets the top-``r_k`` slots by the global score.

    Args:
      global_scores: ``{key: [R]}`` aggregated slot scores.
      ranks: ``[C]`` int ranks (traced OK).

    Returns:
      ``{key: [C, R]}`` masks (not prefixes), ties to the lower slot.
    """
    out = {}
    for k, s in global_scores.items():
        r = _ranks_array(ranks, s.shape[-1])
        out[k] = per_client_topk(jnp.broadcast_to(s, r.shape + s.shape[-1:]), r)
    return out


def hafl_update_masks(client_scores: Mapping[str, Array], ranks, *, first_round=False,
                      init: str = "prefix", key: Array | None = None) -> HaflMasks:
    """HAFL importance-based freezing: forward masks all ones, update mask = own top-``r_k``.

    ASSUMPTION (spec sec. 2.4): the top-k is recomputed at the start of each round from the
    client's scores of the previous round; in round 0 (``first_round``) no scores exist and
    the update mask is a prefix (``init="prefix"``, default) or ``r_k`` random slots
    (``init="random"``, needs ``key``).

    Args:
      client_scores: ``{key: [C, R]}`` each client's own slot scores.
      ranks: ``[C]`` int ranks (traced OK).
      first_round: bool or traced bool.
      init: ``"prefix"`` or ``"random"``.
      key: typed PRNG key, required for ``init="random"``.

    Returns:
      :class:`HaflMasks`.
    """
    if init not in ("prefix", "random"):
        raise ValueError(f"init must be 'prefix' or 'random', got {init!r}")
    if init == "random" and key is None:
        raise ValueError("init='random' needs a PRNG key")
    fwd, upd = {}, {}
    names = sorted(client_scores)
    keys = jax.random.split(key, len(names)) if init == "random" else [None] * len(names)
    for name, kk in zip(names, keys, strict=True):
        s = jnp.asarray(client_scores[name])
        r = _ranks_array(ranks, s.shape[-1])
        if s.shape[:-1] != r.shape:
            raise ValueError(f"client_scores[{name!r}] has shape {s.shape}, expected "
                             f"[C={r.shape[0]}, R]")
        own = per_client_topk(s, r)
        if init == "prefix":
            start = prefix_masks(r, s.shape[-1])
        else:
            start = per_client_topk(jax.random.uniform(kk, s.shape), r)
        upd[name] = jnp.where(first_round, start, own)
        fwd[name] = jnp.ones_like(own)
    return HaflMasks(fwd, upd)


# ---------------------------------------------------------------------- HetLoRA / prefix


def prefix_masks(ranks, r_max: int, *, keys=None, dtype=jnp.float32):
    """Prefix masks from ranks (HetLoRA, replication padding, LEGEND ranks).

    Args:
      ranks: int array ``[...]`` (e.g. ``[C]`` or ``[C, L]``), or ``{key: [...]}``; traced OK.
      r_max: static ``R``.
      keys: if given with an array ``ranks``, return ``{key: mask}`` for each key.
      dtype: mask dtype.

    Returns:
      ``[..., R]`` with ``mask[..., i] = i < rank`` (or a dict of those).
    """
    if not isinstance(r_max, int) or r_max < 1:
        raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")
    if isinstance(ranks, Mapping):
        return {k: prefix_masks(v, r_max, dtype=dtype) for k, v in ranks.items()}
    r = jnp.asarray(ranks)
    if not jnp.issubdtype(r.dtype, jnp.integer):
        raise TypeError(f"ranks must be integers, got dtype {r.dtype}")
    m = (jnp.arange(r_max) < r[..., None]).astype(dtype)
    if keys is not None:
        return {k: m for k in keys}
    return m
