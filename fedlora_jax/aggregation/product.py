"""Product-space aggregators: FlexLoRA (SVD redistribution), FLoRA (stacking), FedEx-LoRA.

All three work with ``sum_k p_k a_k diag(m_k e_k) b_k`` (the exact average of the client
updates, ``[..., N, M]``). FlexLoRA re-factorises it by one truncated SVD per round
(``fedlora_jax.linalg``, never forming ``[N, M]`` when ``C*R < min(N, M)``); FLoRA and
FedEx-LoRA fold (part of) it into the frozen base through ``state.base_delta``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedlora_jax import linalg
from fedlora_jax.aggregation import _common as cm
from fedlora_jax.aggregation.base import (
    Aggregator,
    BaseDeltaState,
    EmptyState,
    check_choice,
    check_inputs,
    check_mapping,
    register,
)
from fedlora_jax.aggregation.padding import _distribute_truncate
from fedlora_jax.lora import LoraFactors, LoraTree

Array = jax.Array

_FLEX_SPLITS = {"b": "all_right", "a": "all_left", "sqrt": "sqrt"}


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a finite Python float > 0 (the LoRA scale alpha / r_max), "
                         f"got {scale!r}")
    return float(scale)


def _base_delta_init(global_lora: LoraTree) -> BaseDeltaState:
    out = {}
    for k, g in global_lora.items():
        shape = g.a.shape[:-1] + g.b.shape[-1:]
        out[k] = jnp.zeros(shape, cm.compute_dtype(g.a))
    return BaseDeltaState(out)


# ---------------------------------------------------------------- FlexLoRA


@register("flexlora")
def flexlora(*, split: str = "b", method: str = "auto", gradient_safe: bool = True) -> Aggregator:
    """FlexLoRA (Bai et al., arXiv 2402.11505): weighted sum of products, SVD, redistribution.

    ``dW = sum_k p_k a_k diag(m_k e_k) b_k`` (the common LoRA scale cancels), one truncated
    SVD ``dW = u diag(s) vt`` per module per round via
    :func:`fedlora_jax.linalg.stacked_lowrank_svd` (QR core on the ``C*R`` stack; dense only
    when ``C*R >= min(N, M)``). The global stores the sorted rank-``R`` truncation; client
    ``k`` receives the prefix ``global * m_k`` = its best rank-``r_k`` approximation
    (Eckart-Young) for prefix masks. With ``e`` present (SVD form) the global is
    ``a = u``, ``e = s``, ``b = vt`` regardless of ``split``.

    ASSUMPTION (spec 3.3): ``p_k`` = data-size weights; ``split="b"`` puts the singular values
    in ``b`` (the paper's ``B``, as RB-LoRA's code); ``"a"`` and ``"sqrt"`` are options
    (products are split-independent).

    Differentiability: NOT differentiable in general (SVD ordering / truncation at a
    degenerate gap, rank-deficient padded stacks). ``gradient_safe=True`` (default) uses the
    linalg gradient-safe SVD rule, so gradients are finite and exact where the singular values
    are distinct and nonzero.

    Args:
      split: ``"b"``, ``"a"`` or ``"sqrt"``.
      method: ``"auto"``, ``"lowrank"`` or ``"dense"`` (passed to ``stacked_lowrank_svd``).
      gradient_safe: use the gradient-safe SVD derivative.
    """
    check_choice(split, "split", tuple(_FLEX_SPLITS))
    check_choice(method, "method", ("auto", "lowrank", "dense"))

    def init(global_lora):
        del global_lora
        return EmptyState()

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        c = check_inputs(global_lora, client_lora, weights, masks)
        check_mapping(extras)
        p, valid = cm.normalize(weights)
        out = {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            mb = cm.binary(m, cd)
            gain = cm.client_gain(f, m, p)
            left = cm.clean(f.a.astype(cd), mb[..., None, :], p) * gain[..., None, :]
            right = cm.clean(f.b.astype(cd), mb[..., :, None], p)
            n, r, mm = g.a.shape[-2], g.a.shape[-1], g.b.shape[-1]
            rank = min(r, n, mm, c * r)
            res = linalg.stacked_lowrank_svd(left, right, p.astype(cd), rank=rank, method=method,
                                             gradient_safe=gradient_safe)
            if g.e is not None:
                pad = r - rank
                u = jnp.pad(res.u, [(0, 0)] * (res.u.ndim - 1) + [(0, pad)])
                s = jnp.pad(res.s, [(0, 0)] * (res.s.ndim - 1) + [(0, pad)])
                vt = jnp.pad(res.vt, [(0, 0)] * (res.vt.ndim - 2) + [(0, pad), (0, 0)])
                new = LoraFactors(u.astype(g.a.dtype), vt.astype(g.b.dtype), s.astype(g.e.dtype))
            else:
                a, b = linalg.truncate_to_factors(res, r, split=_FLEX_SPLITS[split])
                new = LoraFactors(a.astype(g.a.dtype), b.astype(g.b.dtype), None)
            out[k] = cm.keep_if(valid, new, g)
        return out, state

    return Aggregator(init, aggregate, _distribute_truncate, ("a", "b", "e"), ("a", "b", "e"),
                      "flexlora")


# ---------------------------------------------------------------- FLoRA


@register("flora")
def flora(*, scale: float, downlink: str = "stack") -> Aggregator:
    """FLoRA stacking (Wang et al., arXiv 2409.05976), folded into the base.

    The stack ``a_stack = [p_1 a_1 diag(m_1 e_1) | ... ]``, ``b_stack = [b_1; ...; b_C]`` has
    ``a_stack @ b_stack = sum_k p_k a_k diag(m_k e_k) b_k`` exactly; the server merges it:
    ``state.base_delta += scale * a_stack @ b_stack`` (computed as a contraction over ``C``
    and ``R``, masked slots contribute exact zeros). Clients restart from a fresh LoRA.

    ASSUMPTION (spec 3.4): the fresh LoRA keeps the global ``a`` (the shared seed-derived
    initial ``a``, never re-sent) and zeroes ``b`` (so the new adapter's product is 0; with
    ``e`` present, ``e`` is kept and ``b`` zeroed). To re-initialise ``a`` instead, call
    ``fedlora_jax.lora.init`` in the round. Downlink: the stack (``"stack"``,
    ``sum_j r_j (N + M)``) or the dense merged update (``"dense"``, ``N M``).
    Differentiable in weights and client factors (linear in each).

    Args:
      scale: the LoRA scale (``alpha / r_max``) included in ``base_delta``.
      downlink: ``"stack"`` or ``"dense"``.
    """
    scale = _check_scale(scale)
    check_choice(downlink, "downlink", ("stack", "dense"))

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        check_mapping(extras)
        p, valid = cm.normalize(weights)
        out, base = {}, {}
        for k, g in global_lora.items():
            d = scale * cm.weighted_product_sum(client_lora[k], masks[k], p)
            prev = state.base_delta[k]
            base[k] = prev + jnp.where(valid, d.astype(prev.dtype), 0.0)
            fresh = LoraFactors(g.a, jnp.zeros_like(g.b), g.e)
            out[k] = cm.keep_if(valid, fresh, g)
        return out, BaseDeltaState(base)

    return Aggregator(_base_delta_init, aggregate, _distribute_truncate, ("a", "b", "e"), (downlink,),
                      "flora")


# ---------------------------------------------------------------- FedEx-LoRA


@register("fedex_lora")
def fedex_lora(*, scale: float, averaging: str = "zero_pad",
               residual_downlink: str = "dense") -> Aggregator:
    """FedEx-LoRA (Singhal et al., arXiv 2410.09432): FedAvg factors + exact residual in the base.

    ``abar, bbar (, ebar)`` = FedAvg of the factors (``averaging="zero_pad"``: FedIT zero
    padding; ``"renorm"``: per-slot mean (R)); residual
    ``scale * (sum_k p_k a_k diag(m_k e_k) b_k - abar diag(ebar) bbar)`` is added to
    ``state.base_delta``, so ``base_delta_new + scale * abar diag(ebar) bbar ==
    base_delta_old + sum_k p_k scale a_k diag(m_k e_k) b_k`` (exact; residual computed from the
    STORED, cast global). By the identity (X) the residual equals
    ``scale * sum_k p_k (a_k - abar)(b_k - bbar)`` in the homogeneous case.

    ASSUMPTION (spec 3.5): ``p_k`` generalises the paper's ``1/K``; heterogeneous ranks by
    padding (either rule keeps exactness); residual added WITHOUT transpose (kernel layout).
    Slots that no client holds are set to exact zeros (their old contribution is moved into
    the base by the residual), so a client whose mask covers every held slot starts exactly
    from the averaged model.
    Downlink: factors + the dense residual (``"dense"``) or its factored form
    (``"factored"``, counted as the client stack). Differentiable in weights and factors.

    Args:
      scale: the LoRA scale (``alpha / r_max``) included in ``base_delta``.
      averaging: ``"zero_pad"`` or ``"renorm"``.
      residual_downlink: ``"dense"`` or ``"factored"``.
    """
    scale = _check_scale(scale)
    check_choice(averaging, "averaging", ("zero_pad", "renorm"))
    check_choice(residual_downlink, "residual_downlink", ("dense", "factored"))
    renorm = averaging == "renorm"

    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        check_mapping(extras)
        p, valid = cm.normalize(weights)
        out, base = {}, {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            w_slot = cm.bcast(p.astype(cd), m) * cm.binary(m, cd)
            bar = cm.factor_mean(g, f, w_slot, renorm=renorm, p=p)
            bar = cm.truncate(bar, jnp.sum(w_slot, axis=0) > 0)   # unheld slots -> exact zeros
            target = cm.weighted_product_sum(f, m, p)
            resid = scale * (target - cm.global_product(bar))
            prev = state.base_delta[k]
            base[k] = prev + jnp.where(valid, resid.astype(prev.dtype), 0.0)
            out[k] = cm.keep_if(valid, bar, g)
        return out, BaseDeltaState(base)

    down = ("a", "b", "e", "dense" if residual_downlink == "dense" else "stack")
    return Aggregator(_base_delta_init, aggregate, _distribute_truncate, ("a", "b", "e"), down,
                      "fedex_lora")
