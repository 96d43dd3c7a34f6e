"""Factor-space aggregators: FedIT, zero padding (HetLoRA), replication padding, HAFL, FedARA.

All of them are the spec's per-slot weighted mean (R) (``shared/papers/aggregation.md`` 0.3)
with a different slot weight ``w[k, i]`` and denominator. Slots that no client with positive
weight owns keep the previous global value; all-zero weights keep the previous global.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import _common as cm
from fedlora_jax.aggregation.base import (
    Aggregator,
    EmptyState,
    ScoreState,
    check_choice,
    check_inputs,
    check_mapping,
    register,
)
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

Array = jax.Array


def _distribute_truncate(global_lora: LoraTree, masks: MaskTree, state=None, *,
                         client_lora: LoraTree | None = None) -> LoraTree:
    """Prefix (or any-mask) truncation: client gets ``a * m``, ``b * m``, ``e * m``."""
    del state, client_lora
    return {k: cm.truncate(g, masks[k]) for k, g in global_lora.items()}


# ---------------------------------------------------------------- slot-mean family


def _slot_mean_aggregator(name: str, slot_weights, *, renorm: bool, parts=("a", "b", "e"),
                          uplink=("a", "b", "e"), downlink=("a", "b", "e"),
                          distribute=_distribute_truncate) -> Aggregator:
    """Build an aggregator from ``slot_weights(k, g, f, m, p, extras) -> [C, ..., R]``."""

    def init(global_lora):
        del global_lora
        return EmptyState()

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        extras = check_mapping(extras)
        p, valid = cm.normalize(weights)
        out = {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            w_slot = slot_weights(k, g, f, m, p, extras)
            new = cm.factor_mean(g, f, w_slot, renorm=renorm, p=p, parts=parts)
            out[k] = cm.keep_if(valid, new, g)
        return out, state

    return Aggregator(init, aggregate, distribute, tuple(uplink), tuple(downlink), name)


def _data_slot_weights(k, g, f, m, p, extras):
    del k, g, extras
    cd = cm.compute_dtype(f.a)
    return cm.bcast(p.astype(cd), m) * cm.binary(m, cd)


@register("fedit")
def fedit() -> Aggregator:
    """FedIT: FedAvg of the factors (Zhang et al., arXiv 2305.05644).

    ``a = sum_k p_k a_k``, ``b = sum_k p_k b_k`` (``e`` likewise), ``p_k = w_k / sum w``.
    Heterogeneous masks: zero padding (FLoRA's ``zero_padding`` flag, spec 3.1), i.e.
    ``a[:, i] = sum_k p_k m_k[i] a_k[:, i]`` with NO per-slot renormalisation; a slot no
    client owns keeps the previous global. Distribution: ``global * m_k``.
    Not exact in product space: error = ``sum_k p_k (a_k - abar)(b_k - bbar)`` (spec (X)).
    """
    return _slot_mean_aggregator("fedit", _data_slot_weights, renorm=False)


# ---------------------------------------------------------------- HetLoRA


def _safe_sqrt(x: Array) -> Array:
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def product_fro_norm(f: LoraFactors, m: Array, p: Array | None = None) -> Array:
    """``||a diag(m e) b||_F`` per leading index without forming ``[N, M]``, shape ``m.shape[:-1]``.

    Uses ``||a G b||_F^2 = sum_ij (G a^T a G)_ij (b b^T)_ij`` (Gram matrices ``[R, R]``).
    The norm has no derivative at 0 (gradient set to 0 there). ``p [C]`` (optional): clients
    with ``p == 0`` get their non-finite entries zeroed (dropped clients never poison).
    """
    cd = cm.compute_dtype(f.a)
    mb = cm.binary(m, cd)
    p = jnp.ones(m.shape[:1], cd) if p is None else p
    gain = cm.client_gain(f, m, p)
    a = cm.clean(f.a.astype(cd), mb[..., None, :], p) * gain[..., None, :]
    b = cm.clean(f.b.astype(cd), mb[..., :, None], p)
    ga = jnp.einsum("...nr,...ns->...rs", a, a)
    gb = jnp.einsum("...rm,...sm->...rs", b, b)
    return _safe_sqrt(jnp.maximum(jnp.sum(ga * gb, axis=(-2, -1)), 0.0))


@register("zero_padding")
def zero_padding(*, weighting: str = "sparsity", data_weighted: bool = False) -> Aggregator:
    """Zero-padding aggregation of HetLoRA (Cho et al., arXiv 2401.06432).

    ``a = sum_k w_k pad(a_k)``, ``b = sum_k w_k pad(b_k)`` with NO per-slot renormalisation,
    ``w_k = ||a_k diag(m_k e_k) b_k||_F / Z`` (``weighting="sparsity"``, per module; the common
    LoRA scale cancels) or ``w_k = p_k`` (``weighting="data"``, = FedIT zero padding).
    Distribution: prefix truncation ``global * m_k``.

    ASSUMPTION (spec 3.2): the paper's figure gives only ``||S_k|| / Z``; ``data_weighted=True``
    multiplies by ``p_k``. With ``data_weighted=False`` a zero-weight client still gets weight
    0 (``w_k = ||S_k|| 1[p_k > 0]``) so the contract "a zero-weight client changes nothing"
    holds. If all norms of a module are 0 (round 0, ``b = 0``) the weights fall back to ``p_k``.
    Differentiable in the factors except where a client's product is exactly 0 (norm kink).

    Args:
      weighting: ``"sparsity"`` (HetLoRA) or ``"data"``.
      data_weighted: multiply the sparsity weights by ``p_k`` (ASSUMPTION option).
    """
    check_choice(weighting, "weighting", ("sparsity", "data"))
    if weighting == "data" and data_weighted:
        raise ValueError("zero_padding: data_weighted multiplies the sparsity weights; with weighting='data' "
                         "it would be ignored")
    if weighting == "data":
        return _slot_mean_aggregator("zero_padding", _data_slot_weights, renorm=False)

    def slot_weights(k, g, f, m, p, extras):
        del k, g, extras
        cd = cm.compute_dtype(f.a)
        norms = product_fro_norm(f, m, p)                    # [C, ...]
        pk = cm.bcast(p.astype(cd), norms)
        raw = jnp.where(pk > 0, norms * (pk if data_weighted else 1.0), 0.0)
        z = jnp.sum(raw, axis=0, keepdims=True)
        wk = jnp.where(z > 0, raw / jnp.where(z > 0, z, 1.0), pk)
        return wk[..., None] * cm.binary(m, cd)

    return _slot_mean_aggregator("zero_padding", slot_weights, renorm=False)


hetlora = zero_padding


def _tail_mask(m: Array, gamma: float) -> tuple[Array, Array]:
    """(tail ``[..., R]`` = slots ``floor(gamma r) <= i < r``, kept prefix ``i < floor(gamma r)``)."""
    r = jnp.sum(m != 0, axis=-1, keepdims=True)
    cut = jnp.floor(gamma * r)
    idx = jnp.arange(m.shape[-1])
    return (m != 0) & (idx >= cut), idx < cut


def hetlora_tail_norm(lora: LoraTree, masks: MaskTree, *, gamma: float) -> dict[str, Array]:
    """HetLoRA self-pruning tail norm ``||b[tail, :]||_F * ||a[:, tail]||_F`` per module.

    ASSUMPTION (spec 3.2, from third-party reimplementations): tail = the slots
    ``floor(gamma r) <= i < r`` of a prefix mask with ``r = sum(m)``. The local loss adds
    ``lam * sum(values)`` (see :func:`hetlora_prune_regularizer`). Shapes ``m.shape[:-1]``.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    out = {}
    for k, f in lora.items():
        tail, _ = _tail_mask(masks[k], gamma)
        a = jnp.where(tail[..., None, :], f.a.astype(cm.compute_dtype(f.a)), 0.0)
        b = jnp.where(tail[..., :, None], f.b.astype(cm.compute_dtype(f.b)), 0.0)
        out[k] = (_safe_sqrt(jnp.sum(a * a, axis=(-2, -1))) * _safe_sqrt(jnp.sum(b * b, axis=(-2, -1))))
    return out


def hetlora_prune_regularizer(lora: LoraTree, masks: MaskTree, *, gamma: float = 0.99,
                              lam: float = 1e-3) -> Array:
    """Scalar local regulariser ``lam * sum_modules ||b_tail||_F ||a_tail||_F`` (HetLoRA)."""
    return lam * sum(jnp.sum(v) for v in hetlora_tail_norm(lora, masks, gamma=gamma).values())


def hetlora_prune_masks(masks: MaskTree, tail_now: Mapping[str, Array],
                        tail_prev: Mapping[str, Array], *, gamma: float = 0.99) -> MaskTree:
    """HetLoRA prune rule: where the tail norm decreased vs the previous round, ``r <- floor(gamma r)``.

    ASSUMPTION (spec 3.2). Ranks only shrink; shapes stay static (mask bits are zeroed).
    The caller zeroes the factors with ``lora.apply_masks``.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    out = {}
    for k, m in masks.items():
        _, keep = _tail_mask(m, gamma)
        prune = (tail_now[k] < tail_prev[k])[..., None]
        out[k] = jnp.where(prune & ~keep, jnp.zeros((), m.dtype), m)
    return out


# ---------------------------------------------------------------- replication padding


@register("replication_padding")
def replication_padding(*, variant: str = "mean") -> Aggregator:
    """Replication padding (Byun & Lee, arXiv 2406.17477).

    ``variant="mean"`` (REP-MEAN, default): a client missing slot ``i`` is padded with the
    p-weighted mean of the owners' slot ``i``, then FedAvg; closed form = primitive (R) with
    ``w[k, i] = p_k m_k[i]`` renormalised per slot:
    ``a[:, i] = sum_k p_k m_k[i] a_k[:, i] / sum_k p_k m_k[i]``.
    ``variant="copy"`` (REP-COPY): the missing slot is a verbatim copy of the donor's slot,
    donor = the owner with the highest rank (ties: the larger weight, then the lower index):
    ``a[:, i] = sum_{k owns i} p_k a_k[:, i] + (1 - P_i) a_donor(i)[:, i]``.

    ASSUMPTION (spec 1.1): the paper body was not read; REP-MEAN is the reconstruction with a
    closed form; REP-COPY's donor rule is ours. Distribution: prefix truncation. Slots no
    client owns keep the previous global. Differentiable (REP-COPY: piecewise in the weights).
    """
    check_choice(variant, "variant", ("mean", "copy"))
    if variant == "mean":
        return _slot_mean_aggregator("replication_padding", _data_slot_weights, renorm=True)

    def slot_weights(k, g, f, m, p, extras):
        del k, g, extras
        cd = cm.compute_dtype(f.a)
        mb = cm.binary(m, cd)
        pk = cm.bcast(p.astype(cd), mb)
        own = mb * pk                                           # [C, ..., R]
        rank = jnp.sum(mb, axis=-1, keepdims=True)              # [C, ..., 1]
        c = m.shape[0]
        order = -jnp.arange(c, dtype=cd).reshape((c,) + (1,) * (m.ndim - 1)) / (2.0 * c)
        score = rank + 0.5 * jax.lax.stop_gradient(pk) + 0.25 * order / c
        score = jnp.where(own > 0, score, -jnp.inf)
        owned = jnp.sum(own, axis=0, keepdims=True)             # P_i
        donor = jax.nn.one_hot(jnp.argmax(score, axis=0), c, axis=0, dtype=cd) * (owned > 0)
        short = 1.0 - owned
        return own + donor * short

    return _slot_mean_aggregator("replication_padding", slot_weights, renorm=True)


# ---------------------------------------------------------------- HAFL rank-1 adaptive


def _scores_or_zero(extras, k, m, cd):
    sc = extras.get("scores")
    if sc is None:
        return None
    if k not in sc:
        raise ValueError(f"extras['scores'] has no entry for module {k!r}")
    s = jnp.asarray(sc[k])
    if s.shape != m.shape:
        raise ValueError(f"extras['scores'][{k!r}] has shape {s.shape}, expected {m.shape} ([C, ..., R])")
    return s.astype(cd)


def _aggregate_scores(g, m, p, s, prev, *, beta):
    """``S_bar = beta * prev + (1 - beta) * sum_k p_k m_k S_k`` (``[..., R]``)."""
    cd = s.dtype
    mb = cm.binary(m, cd)
    new = jnp.sum(cm.bcast(p.astype(cd), mb) * cm.clean(s, mb, p), axis=0)
    return (beta * prev.astype(cd) + (1.0 - beta) * new).astype(prev.dtype)


def _score_init(global_lora):
    return ScoreState({k: jnp.zeros(g.a.shape[:-2] + g.a.shape[-1:], cm.compute_dtype(g.a))
                       for k, g in global_lora.items()})


@register("rank1_adaptive")
def rank1_adaptive(*, importance_weighted: bool = False, score_beta: float = 0.0) -> Aggregator:
    """HAFL rank-1 adaptive aggregation (Su et al., arXiv 2411.06581), spec 2.5.

    ``masks`` are the UPDATE masks ``u_k`` (the rank-1 components client k trained):
    ``a[:, i] = sum_k p_k u_k[i] a_k[:, i] / sum_k p_k u_k[i]``; components nobody updated keep
    the previous global bit-exactly. Distribution returns the full global times the mask it is
    given (HAFL freezing: pass the all-ones forward mask; truncation scheme: the top-r_k mask).

    ASSUMPTION (spec 2.5): exact weights; ``importance_weighted=True`` uses
    ``w[k, i] = p_k u_k[i] S_k[i]`` with ``extras["scores"][key]: [C, ..., R]`` (falls back to
    ``p_k u_k[i]`` on a slot whose scores are all 0). The state keeps ``S_bar = sum_k p_k u_k S_k``
    (EMA over rounds with ``score_beta``) for the top-k selection of the next round.
    Differentiable in weights and factors (importance weighting: also in the scores).
    """
    if not 0.0 <= score_beta < 1.0:
        raise ValueError(f"score_beta must be in [0, 1), got {score_beta!r}")

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        extras = check_mapping(extras)
        if importance_weighted and extras.get("scores") is None:
            raise ValueError("rank1_adaptive(importance_weighted=True) needs extras['scores']")
        p, valid = cm.normalize(weights)
        out, scores = {}, {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            base = _data_slot_weights(k, g, f, m, p, extras)
            s = _scores_or_zero(extras, k, m, cd)
            w_slot = base
            if importance_weighted:
                imp = base * jnp.maximum(cm.clean(s, base, p), 0.0)
                has = jnp.sum(imp, axis=0, keepdims=True) > 0
                w_slot = jnp.where(has, imp, base)
            out[k] = cm.keep_if(valid, cm.factor_mean(g, f, w_slot, renorm=True, p=p), g)
            prev = state.scores[k]
            scores[k] = prev if s is None else jnp.where(
                valid, _aggregate_scores(g, m, p, s, prev, beta=score_beta), prev)
        return out, ScoreState(scores)

    return Aggregator(_score_init, aggregate, _distribute_truncate, ("a", "b", "e"), ("a", "b", "e"),
                      "rank1_adaptive")


# ---------------------------------------------------------------- FedARA


@register("fedara")
def fedara(*, averaging: str = "renorm", score_beta: float = 0.0) -> Aggregator:
    """FedARA server step 9 (Wu et al., arXiv 2501.14406; spec fedara_legend.md 1.4).

    FedAvg of every active entry of ``P`` (our ``b``), ``lambda`` (``e``) and ``Q`` (``a``):
    ``theta = sum_k p_k m_k theta_k / sum_k p_k m_k`` per triplet; aggregated scores
    ``S_bar = beta_s S_bar_prev + (1 - beta_s) sum_k p_k m_k S_k`` from
    ``extras["scores"][key]: [C, ..., R]`` kept in ``state.scores`` for the rank allocator
    (unchanged when no scores are passed). Distribution: ``global * z`` (the client mask).

    ASSUMPTION (spec 1.4 step 9, 1.9.6): data-size weights; FedARA clients share one global
    mask so ``averaging="renorm"`` (per-triplet renormalisation over the clients that hold it,
    the LEGEND per-slot mean of fedara_legend.md 2.4) and ``"zero_pad"`` agree there; they
    differ only for heterogeneous masks. ``score_beta=0`` = no smoothing across rounds.
    Differentiable in weights, factors and scores.
    """
    check_choice(averaging, "averaging", ("renorm", "zero_pad"))
    if not 0.0 <= score_beta < 1.0:
        raise ValueError(f"score_beta must be in [0, 1), got {score_beta!r}")
    renorm = averaging == "renorm"

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        extras = check_mapping(extras)
        p, valid = cm.normalize(weights)
        out, scores = {}, {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            w_slot = _data_slot_weights(k, g, f, m, p, extras)
            out[k] = cm.keep_if(valid, cm.factor_mean(g, f, w_slot, renorm=renorm, p=p), g)
            s = _scores_or_zero(extras, k, m, cd)
            prev = state.scores[k]
            scores[k] = prev if s is None else jnp.where(
                valid, _aggregate_scores(g, m, p, s, prev, beta=score_beta), prev)
        return out, ScoreState(scores)

    return Aggregator(_score_init, aggregate, _distribute_truncate, ("a", "b", "e", "scores"),
                      ("a", "b", "e"), "fedara")
