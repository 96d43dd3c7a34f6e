"""One-factor aggregators: FFA-LoRA (``a`` frozen, ``b`` averaged), FedSA-LoRA (``a`` shared)."""

from __future__ import annotations

import jax

from fedlora_jax.aggregation import _common as cm
from fedlora_jax.aggregation.base import (
    Aggregator,
    EmptyState,
    check_choice,
    check_inputs,
    check_mapping,
    register,
)
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

Array = jax.Array


def _init(global_lora):
    del global_lora
    return EmptyState()


def _one_factor_aggregate(parts: tuple[str, ...], renorm: bool):
    def aggregate(global_lora, client_lora, weights, masks, state, *, extras=None):
        check_inputs(global_lora, client_lora, weights, masks)
        check_mapping(extras)
        p, valid = cm.normalize(weights)
        out = {}
        for k, g in global_lora.items():
            f, m = client_lora[k], masks[k]
            cd = cm.compute_dtype(f.a)
            w_slot = cm.bcast(p.astype(cd), m) * cm.binary(m, cd)
            out[k] = cm.keep_if(valid, cm.factor_mean(g, f, w_slot, renorm=renorm, p=p, parts=parts), g)
        return out, state

    return aggregate


@register("ffa_lora")
def ffa_lora() -> Aggregator:
    """FFA-LoRA (Sun et al., arXiv 2403.12313): ``a`` frozen and shared, only ``b`` averaged.

    ``b = sum_k p_k m_k b_k`` (zero padding, NO per-slot renormalisation), ``a`` = the global
    (seed-shared) ``a``, untouched; client ``a`` values are ignored. Exact in product space:
    ``a @ b_glob == sum_k p_k a diag(m_k) b_k`` (per-slot renormalisation would break this).
    ``e`` (if present) is averaged like ``b`` (then exactness holds only for plain LoRA).

    ASSUMPTION (spec 3.6): heterogeneous ranks = one shared ``a [N, R]`` whose slots ``m_k``
    client ``k`` uses. The client must not update ``a`` (mask its optimizer update).
    Distribution: ``global * m_k``. Differentiable in weights and ``b`` (linear).
    """
    return Aggregator(_init, _one_factor_aggregate(("b", "e"), False), _distribute_ffa, ("b", "e"),
                      ("b", "e"), "ffa_lora")


def _distribute_ffa(global_lora: LoraTree, masks: MaskTree, state=None, *,
                    client_lora: LoraTree | None = None) -> LoraTree:
    del state, client_lora
    return {k: cm.truncate(g, masks[k]) for k, g in global_lora.items()}


@register("fedsa_lora")
def fedsa_lora(*, averaging: str = "zero_pad") -> Aggregator:
    """FedSA-LoRA (Guo et al., arXiv 2410.01463): only ``a`` is shared and averaged.

    ``a = sum_k p_k m_k a_k`` (``averaging="zero_pad"``) or the per-slot mean (R)
    (``"renorm"``); ``b`` (and ``e``) stay client-local: the server's ``b``/``e`` are left
    untouched and client values are never read. Client ``k``'s model is
    ``scale * a_glob diag(m_k) b_k`` (personalised).

    How ``b`` stays local: the round keeps every client's last tree and passes it to
    ``distribute(global, masks, state, client_lora=that_client_tree)``, which returns the
    global ``a`` with the client's own ``b`` and ``e``; without ``client_lora`` the server's
    ``b``/``e`` are used (e.g. round 0 or a never-seen client).

    ASSUMPTION (spec 3.7): heterogeneous ranks by zero padding (default) or (R).
    Differentiable in weights and ``a`` (linear).
    """
    check_choice(averaging, "averaging", ("zero_pad", "renorm"))
    return Aggregator(_init, _one_factor_aggregate(("a",), averaging == "renorm"), _distribute_fedsa,
                      ("a",), ("a",), "fedsa_lora")


def _distribute_fedsa(global_lora: LoraTree, masks: MaskTree, state=None, *,
                      client_lora: LoraTree | None = None) -> LoraTree:
    del state
    out = {}
    for k, g in global_lora.items():
        if client_lora is not None:
            own = client_lora[k]
            if own.b.shape != g.b.shape:
                raise ValueError(f"module {k!r}: client_lora b has shape {own.b.shape}, expected "
                                 f"{g.b.shape} (one client, no C axis)")
            g = LoraFactors(g.a, own.b.astype(g.b.dtype),
                            None if g.e is None else own.e.astype(g.e.dtype))
        out[k] = cm.truncate(g, masks[k])
    return out
