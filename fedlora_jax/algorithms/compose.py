"""Algorithms as compositions: an aggregator + rank rules + what each client is told to do.

Each factory returns an :class:`Algorithm`: the round engine's static options (importance
tracking, shared masks, regulariser, in-jit rank rule) and a host-side ``plan`` that turns the
server state into each sampled client's masks for the next round.

=============  =====================================================================
name           composition
=============  =====================================================================
fedit          FedAvg of factors (FedIT, arXiv 2305.05644); heterogeneous ranks are
               zero-padded (no per-slot renormalisation)
hetlora        zero padding + sparsity-weighted aggregation (HetLoRA, arXiv 2401.06432)
replication    replication padding, REP-MEAN (Byun & Lee, arXiv 2406.17477)
flexlora       weighted product sum + SVD redistribution (arXiv 2402.11505)
flora          stacking folded into the base (arXiv 2409.05976)
fedex          FedAvg + residual folded into the base (arXiv 2410.09432)
ffa            A frozen and shared, B trained (arXiv 2403.12313)
fedsa          only A shared and averaged, B stays local (arXiv 2410.01463)
hafl           importance-based freezing (default) or truncation + rank-1 adaptive
               aggregation (HAFL, arXiv 2411.06581)
fedara         SVD-form adapter, cubic budget, global nested masks, module pruning
               (FedARA, arXiv 2501.14406)
legend         per-device LoRA depth and rank ramp from the LCD configurator + per-slot
               aggregation over contributors (LEGEND, arXiv 2412.20004)
=============  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as agg_lib
from fedlora_jax import importance as imp
from fedlora_jax.algorithms import rank_rules


class AlgoContext(NamedTuple):
    """Static facts an algorithm plans with.

    Attributes:
      keys: adapter keys (``"layer.{i}.{module}"``), sorted.
      layer_of_key: ``{key: layer}``.
      num_layers: ``L``.
      r_max: ``R``.
      client_ranks: ``[K]`` int rank budget of every client of the population.
      client_devices: ``[K]`` int device-profile index of every client.
      rounds: total rounds ``T``.
      scale: LoRA scale.
      options: algorithm hyperparameters (``ExperimentConfig.algo``).
      aggregator_options: forwarded to the aggregator factory.
      planner: optional host object (LEGEND's configurator) built by the driver.
    """

    keys: tuple[str, ...]
    layer_of_key: dict
    num_layers: int
    r_max: int
    client_ranks: np.ndarray
    client_devices: np.ndarray
    rounds: int
    scale: float
    options: dict
    aggregator_options: dict
    planner: Any = None


class Plan(NamedTuple):
    """Host-side per-round instructions: ``masks``/``update_masks`` ``{key: [C, R]}`` (or
    ``[R]`` when the algorithm uses shared masks), optional ``depth_mask [C, L]``."""

    masks: dict
    update_masks: dict
    depth_mask: np.ndarray | None = None


class Algorithm(NamedTuple):
    name: str
    aggregator: Any
    init_scheme: str
    track_importance: bool
    shared_masks: bool
    regularizer: Callable | None
    rank_rule: Callable | None
    frozen_parts: tuple[str, ...]
    init_extra: Callable[[dict], dict]
    plan: Callable[[Any, np.ndarray, int], Plan]
    observe: Callable[[Any, np.ndarray, dict], Any] | None = None
    personal_lora: bool = False
    static_cut: bool = False


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    bad = set(options) - set(allowed)
    if bad:
        raise ValueError(f"algorithm {name!r}: unknown option(s) {sorted(bad)}; allowed: {list(allowed)}")


def _prefix_plan(ctx: AlgoContext):
    def plan(state, client_ids, round_idx):
        del state, round_idx
        ranks = ctx.client_ranks[np.asarray(client_ids)]
        m = (np.arange(ctx.r_max)[None, :] < ranks[:, None]).astype(np.float32)
        masks = {k: m for k in ctx.keys}
        return Plan(masks, masks)

    return plan


def _static_rank(name: str, aggregator, ctx: AlgoContext, *, frozen_parts=()) -> Algorithm:
    _check_options(name, ctx.options, ())
    return Algorithm(name, aggregator, "a_random_b_zero", False, False, None, None, tuple(frozen_parts),
                     lambda lora: {}, _prefix_plan(ctx))


def fedit(ctx: AlgoContext) -> Algorithm:
    return _static_rank("fedit", agg_lib.fedit(**ctx.aggregator_options), ctx)


def hetlora(ctx: AlgoContext) -> Algorithm:
    return _static_rank("hetlora", agg_lib.zero_padding(**ctx.aggregator_options), ctx)


def replication(ctx: AlgoContext) -> Algorithm:
    return _static_rank("replication", agg_lib.replication_padding(**ctx.aggregator_options), ctx)


def flexlora(ctx: AlgoContext) -> Algorithm:
    return _static_rank("flexlora", agg_lib.flexlora(**ctx.aggregator_options), ctx)


def flora(ctx: AlgoContext) -> Algorithm:
    return _static_rank("flora", agg_lib.flora(scale=ctx.scale, **ctx.aggregator_options), ctx)


def fedex(ctx: AlgoContext) -> Algorithm:
    return _static_rank("fedex", agg_lib.fedex_lora(scale=ctx.scale, **ctx.aggregator_options), ctx)


def ffa(ctx: AlgoContext) -> Algorithm:
    return _static_rank("ffa", agg_lib.ffa_lora(**ctx.aggregator_options), ctx, frozen_parts=("a",))


def fedsa(ctx: AlgoContext) -> Algorithm:
    """FedSA-LoRA (arXiv 2410.01463): ``a`` shared and averaged, ``b`` stays on each client.

    Every client's last adapter is kept in ``extra["personal"]`` (population-sized, on the
    server in this simulation; on a real deployment it stays on the device) and its own ``b``
    is handed back by ``distribute``. Global evaluation uses the server's ``a`` with the
    server's ``b`` (which FedSA never updates); per-client evaluation is the meaningful one.
    """
    _check_options("fedsa", ctx.options, ())
    base = _static_rank("fedsa", agg_lib.fedsa_lora(**ctx.aggregator_options), ctx)
    k = len(ctx.client_ranks)

    def init_extra(lora):
        return {"personal": jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape).copy(), lora)}

    return base._replace(init_extra=init_extra, personal_lora=True)


HAFL_OPTIONS = ("mode", "first_round_init")


def hafl(ctx: AlgoContext) -> Algorithm:
    """HAFL (arXiv 2411.06581).

    ``mode="freeze"`` (default, the paper's proposed scheme): every client runs the full
    global adapter (forward mask all ones) and updates only its top-``r_k`` rank-1 components
    by its own smoothed-sensitivity scores from its previous participation (ASSUMPTION, spec
    2.4: a client never seen before starts with a prefix); ``mode="truncate"``: the client
    receives only its top-``r_k`` components by the aggregated global score (spec 2.3).
    Aggregation: rank-1 adaptive (only clients that updated a component average it).
    """
    _check_options("hafl", ctx.options, HAFL_OPTIONS)
    mode = ctx.options.get("mode", "freeze")
    if mode not in ("freeze", "truncate"):
        raise ValueError(f"hafl option mode must be 'freeze' or 'truncate', got {mode!r}")
    aggregator = agg_lib.rank1_adaptive(**ctx.aggregator_options)
    num_clients = len(ctx.client_ranks)

    def init_extra(lora):
        return {"client_scores": {k: jnp.zeros((num_clients, ctx.r_max), jnp.float32) for k in ctx.keys},
                "seen": jnp.zeros((num_clients,), jnp.bool_),
                "global_scores": {k: jnp.zeros((ctx.r_max,), jnp.float32) for k in ctx.keys}}

    def plan(state, client_ids, round_idx):
        ids = np.asarray(client_ids)
        ranks = jnp.asarray(ctx.client_ranks[ids], jnp.int32)
        if mode == "truncate":
            gs = state.extra["global_scores"]
            first = round_idx == 0
            masks = (rank_rules.prefix_masks(ranks, ctx.r_max, keys=ctx.keys) if first
                     else rank_rules.hafl_truncation_masks(gs, ranks))
            masks = {k: np.asarray(v) for k, v in masks.items()}
            return Plan(masks, masks)
        scores = {k: v[ids] for k, v in state.extra["client_scores"].items()}
        seen = np.asarray(state.extra["seen"])[ids]
        hm = rank_rules.hafl_update_masks(scores, ranks, first_round=False)
        prefix = rank_rules.prefix_masks(ranks, ctx.r_max)
        upd = {k: np.where(seen[:, None], np.asarray(v), np.asarray(prefix)) for k, v in hm.update.items()}
        fwd = {k: np.asarray(v) for k, v in hm.forward.items()}
        return Plan(fwd, upd)

    def observe(state, client_ids, metrics):
        ids = jnp.asarray(client_ids)
        extra = dict(state.extra)
        cs = metrics["client_scores"]
        extra["client_scores"] = {k: v.at[ids].set(cs[k]) for k, v in extra["client_scores"].items()}
        extra["seen"] = extra["seen"].at[ids].set(True)
        extra["global_scores"] = {k: jnp.asarray(v) for k, v in metrics["agg_scores"].items()}
        return state._replace(extra=extra)

    return Algorithm("hafl", aggregator, "a_random_b_zero", True, False, None, None, (), init_extra, plan,
                     observe)


FEDARA_OPTIONS = ("target_rank", "orth_reg", "t_init_frac", "t_final_frac", "mask_interval", "r_min", "nested",
                  "static_cut")


def fedara(ctx: AlgoContext) -> Algorithm:
    """FedARA (arXiv 2501.14406), as reconstructed in ``shared/papers/fedara_legend.md`` 1.4.

    SVD-form adapters (``a`` = Q^T, ``b`` = P^T, ``e`` = lambda = 0 at init), AdaLoRA
    importance on every client (EMA reset per round: ASSUMPTION), aggregated triplet scores,
    cubic budget indexed by round from ``b0 = n * r_max`` to ``b_T = n * target_rank``
    (``t_init = t_init_frac * T``, ``t_final = t_final_frac * T``; defaults 0.1 / 0.2), a global
    *nested* mask (pruned triplets are never trained or sent again), module pruning (a module
    with no active slot does no adapter matmul: masks are shared, not batched) and no
    backward pass below the lowest active layer. Orthogonality regulariser weight
    ``orth_reg`` (default 0.1, AdaLoRA scripts). The allocation runs inside the jitted round.
    ``nested=False`` recomputes the global top-k over all triplets at each allocation
    (AdaLoRA's centralised rule). Caveat, measured: in this federated form a pruned triplet is
    neither trained nor scored (its gain is masked, so its gradient is 0), its aggregated score
    is 0 and it never revives, so the run equals FedARA's exactly (experiments/README.md). A
    faithful AdaLoRA baseline needs gradients for masked ``lambda`` (not implemented).
    ``static_cut=True``: the backward pass below the lowest active layer is removed from the
    compiled program (a Python-int cut), so its FLOPs and saved activations really disappear;
    the round is recompiled each time that layer moves up (at most ``L`` times per run).
    Default False: one compile, the same gradients, but the work below the cut still runs.
    """
    _check_options("fedara", ctx.options, FEDARA_OPTIONS)
    o = ctx.options
    n = len(ctx.keys)
    target = int(o.get("target_rank", max(1, ctx.r_max // 3)))
    if not 1 <= target <= ctx.r_max:
        raise ValueError(f"fedara option target_rank must be in [1, r_max={ctx.r_max}], got {target}")
    schedule = imp.BudgetSchedule(b0=n * ctx.r_max, b_final=n * target,
                                  t_init=int(round(o.get("t_init_frac", 0.1) * ctx.rounds)),
                                  t_final=int(round(o.get("t_final_frac", 0.2) * ctx.rounds)),
                                  total=ctx.rounds, mask_interval=int(o.get("mask_interval", 1)))
    gamma = float(o.get("orth_reg", 0.1))
    r_min = int(o.get("r_min", 1))
    nested = bool(o.get("nested", True))
    aggregator = agg_lib.fedara(**ctx.aggregator_options)

    def regularizer(lora, masks):
        return gamma * rank_rules.orth_regularizer(lora, masks)

    def rank_rule(state, agg_scores):
        z = state.extra["z"]
        # state.round was already advanced: the allocation is for the round about to start.
        new_z = rank_rules.fedara_allocate(z, agg_scores, state.round, schedule, r_min=r_min, nested=nested)
        return dict(state.extra, z=new_z)

    def init_extra(lora):
        return {"z": {k: jnp.ones((ctx.r_max,), jnp.float32) for k in ctx.keys}}

    def plan(state, client_ids, round_idx):
        z = {k: np.asarray(v) for k, v in state.extra["z"].items()}
        c = len(client_ids)
        upd = {k: np.broadcast_to(v, (c, ctx.r_max)).copy() for k, v in z.items()}
        return Plan(z, upd)

    return Algorithm("fedara", aggregator, "svd_form", True, True, regularizer if gamma > 0 else None,
                     rank_rule, (), init_extra, plan, static_cut=bool(o.get("static_cut", False)))


def legend(ctx: AlgoContext) -> Algorithm:
    """LEGEND (arXiv 2412.20004): each device's LoRA depth and per-layer rank ramp come from
    the host-side configurator (``ctx.planner``, see :mod:`fedlora_jax.algorithms.legend`),
    re-planned each round from the measured (simulated) client times; aggregation is the
    per-slot mean over the clients that trained the slot (spec 2.4, same algebra as
    replication padding's REP-MEAN)."""
    _check_options("legend", ctx.options, ("r_min",))
    if ctx.planner is None:
        raise ValueError("legend needs a planner (the driver builds one from the device profiles)")
    aggregator = agg_lib.replication_padding(**ctx.aggregator_options)

    def plan(state, client_ids, round_idx):
        layer_ranks = ctx.planner.layer_ranks(np.asarray(client_ids))  # [C, L]
        masks = {}
        for k in ctx.keys:
            r = layer_ranks[:, ctx.layer_of_key[k]]
            masks[k] = (np.arange(ctx.r_max)[None, :] < r[:, None]).astype(np.float32)
        depth = (layer_ranks > 0).astype(np.float32)
        return Plan(masks, masks, depth)

    def observe(state, client_ids, metrics):
        ctx.planner.observe(np.asarray(client_ids), metrics)
        return state

    return Algorithm("legend", aggregator, "a_random_b_zero", False, False, None, None, (),
                     lambda lora: {}, plan, observe)


BUILDERS: dict[str, Callable[[AlgoContext], Algorithm]] = {
    "fedit": fedit, "hetlora": hetlora, "replication": replication, "flexlora": flexlora,
    "flora": flora, "fedex": fedex, "ffa": ffa, "fedsa": fedsa, "hafl": hafl, "fedara": fedara, "legend": legend,
}


def build_algorithm(name: str, ctx: AlgoContext) -> Algorithm:
    """The :class:`Algorithm` called ``name`` (see the table above); clear error if unknown."""
    if name not in BUILDERS:
        import difflib

        close = difflib.get_close_matches(name, list(BUILDERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](ctx)
