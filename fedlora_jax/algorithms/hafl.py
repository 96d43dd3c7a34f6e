"""HAFL (Su et al., arXiv 2411.06581): importance-based rank-1 freezing or truncation, and
rank-1-level adaptive aggregation, for federated LLM fine-tuning with heterogeneous ranks.

``mode="freeze"`` (default, the paper's proposed scheme): every client runs the full global
adapter (forward mask all ones) and updates only its ``r_k`` most important rank-1 components;
the other components stay frozen but are still *scored* from their gradients, so the
selection moves when another component becomes more important. A client's scores are kept
per client (``ServerState.clients``) from its previous participation.

``mode="truncate"``: client ``k`` receives only its top-``r_k`` components by the global
score of each component, the mean of the owners' scores (renormalised over the clients that
held the component, so a high slot owned by few clients is not penalised), smoothed across
rounds with the aggregator's ``score_beta``.

Aggregation: rank-1 adaptive (:func:`fedlora_jax.aggregation.rank1_adaptive`): each component
is averaged over the clients that updated it and kept where nobody did.

Importance (``importance``): ``"sensitivity"`` (default; the abstract's "smoothed
sensitivity", AdaLoRA's ``Ibar = EMA |w * g|``) or ``"sensitivity_uncertainty"`` (AdaLoRA's
``Ibar * Ubar``).

ASSUMPTIONS (spec ``shared/papers/aggregation.md`` 2.3-2.4; the paper body was not read):
the top-``r_k`` is recomputed at the start of each participation from the client's scores of
its previous one; a client seen for the first time (and every client in truncation round 0)
starts with ``first_round_init``: the rank prefix (``"prefix"``) or ``r_k`` random components
(``"random"``, drawn from ``default_rng([seed, round, 3, client])``). A component nobody has
trained yet has sensitivity exactly 0 (``b = 0``), so a pure sensitivity rule needs such a
symmetry-breaking start.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms import rank_rules
from fedlora_jax.algorithms.base import (
    AlgoContext,
    Algorithm,
    ClientOptions,
    ClientPlan,
    ClientStateRule,
    prefix_plan_masks,
)
from fedlora_jax.importance import per_client_topk

IMPORTANCE = {"sensitivity": False, "sensitivity_uncertainty": True}  # -> ClientOptions.uncertainty


class HaflClientState(NamedTuple):
    """Per-client history (leaves ``[K, ...]``).

    Attributes:
      scores: ``{key: [K, R]}`` float32 component scores from the client's last participation.
      seen: ``[K]`` bool, the client has taken part at least once.
    """

    scores: dict
    seen: jax.Array


class HaflState(NamedTuple):
    """Server state of the truncation scheme.

    Attributes:
      global_scores: ``{key: [R]}`` float32 per-component score (owner-renormalised mean,
        smoothed over rounds).
    """

    global_scores: dict


def owner_mean_scores(client_scores, masks, weights, prev, *, beta: float = 0.0):
    """Per-component score over the clients that held it, smoothed across rounds.

    ``S_i = sum_k p_k m_ki S_ki / sum_k p_k m_ki`` where some client with ``p_k > 0`` held
    component ``i`` (else ``S_i`` keeps ``prev_i``); then ``beta * prev + (1 - beta) * S``.

    Args:
      client_scores: ``{key: [C, R]}``.
      masks: ``{key: [C, R]}`` components each client held.
      weights: ``[C]`` non-negative.
      prev: ``{key: [R]}`` previous scores.
      beta: smoothing factor in ``[0, 1)``.

    Returns:
      ``{key: [R]}`` float32.
    """
    out = {}
    for k, s in client_scores.items():
        w = weights[:, None] * (masks[k] != 0)
        tot = jnp.sum(w, axis=0)
        mean = jnp.sum(w * s, axis=0) / jnp.where(tot > 0, tot, 1.0)
        mixed = beta * prev[k] + (1.0 - beta) * mean
        out[k] = jnp.where(tot > 0, mixed, prev[k]).astype(jnp.float32)
    return out


def _top_masks(scores, ranks: np.ndarray) -> np.ndarray:
    """``[C, R]`` host masks of each row's top-``ranks[c]`` entries (ties to the lower slot)."""
    return np.asarray(per_client_topk(jnp.asarray(scores), jnp.asarray(ranks)))


def _start_masks(init: str, ranks: np.ndarray, client_ids: np.ndarray, r_max: int, seed: int,
                 round_idx: int) -> np.ndarray:
    if init == "prefix":
        return prefix_plan_masks(ranks, r_max)
    draws = np.stack([np.random.default_rng([seed, round_idx, 3, int(c)]).random(r_max) for c in client_ids])
    return _top_masks(draws, ranks)


def build(ctx: AlgoContext, *, mode: str = "freeze", first_round_init: str = "prefix",
          importance: str = "sensitivity") -> Algorithm:
    """HAFL (Su et al., arXiv 2411.06581): each client updates only its ``r_k`` most important
    rank-1 components (``"freeze"``) or receives only them (``"truncate"``); the server averages
    every component over the clients that updated it (details: the module docstring).

    Args:
      ctx: the algorithm context.
      mode: ``"freeze"`` or ``"truncate"``.
      first_round_init: ``"prefix"`` or ``"random"`` (the start selection, see ASSUMPTIONS).
      importance: ``"sensitivity"`` or ``"sensitivity_uncertainty"``.

    Aggregator options (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.rank1_adaptive``): ``importance_weighted``, ``score_beta`` (only
    with ``mode="truncate"``).
    """
    if mode not in ("freeze", "truncate"):
        raise ValueError(f"hafl option mode must be 'freeze' or 'truncate', got {mode!r}")
    if first_round_init not in ("prefix", "random"):
        raise ValueError(f"hafl option first_round_init must be 'prefix' or 'random', got {first_round_init!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"hafl option importance must be one of {sorted(IMPORTANCE)}, got {importance!r}")
    agg_opts = dict(ctx.aggregator_options)
    beta = float(agg_opts.get("score_beta", 0.0))
    if mode == "freeze" and beta != 0.0:
        raise ValueError("hafl: aggregator option score_beta smooths the global component scores of "
                         "mode='truncate'; mode='freeze' selects by each client's own scores")
    aggregator = agg_lib.rank1_adaptive(**agg_opts)
    client = ClientOptions(track_importance=True, uncertainty=IMPORTANCE[importance])
    keys, r_max = ctx.keys, ctx.r_max
    options = dict(mode=mode, first_round_init=first_round_init, importance=importance)

    def ranks_of(client_ids):
        return np.asarray(ctx.client_ranks[np.asarray(client_ids)], np.int64)

    if mode == "freeze":
        def init_clients(lora, num_clients):
            del lora
            return HaflClientState({k: jnp.zeros((num_clients, r_max), jnp.float32) for k in keys},
                                   jnp.zeros((num_clients,), jnp.bool_))

        def update_client(old, out):
            del old
            return HaflClientState({k: out.scores[k].astype(jnp.float32) for k in keys}, jnp.ones((), jnp.bool_))

        def plan(state, client_ids, round_idx):
            ids = np.asarray(client_ids)
            ranks = ranks_of(ids)
            seen = np.asarray(state.clients.seen)[ids]
            start = _start_masks(first_round_init, ranks, ids, r_max, ctx.seed, round_idx)
            ones = np.ones((len(ids), r_max), np.float32)
            upd = {k: np.where(seen[:, None], _top_masks(np.asarray(state.clients.scores[k])[ids], ranks), start)
                   for k in keys}
            return ClientPlan({k: ones for k in keys}, upd)

        return Algorithm(name="hafl", aggregator=aggregator, plan=plan, client=client,
                         client_state=ClientStateRule(init_clients, update_client), options=options)

    def init(lora):
        del lora
        return HaflState({k: jnp.zeros((r_max,), jnp.float32) for k in keys})

    def server_update(algo_state, out):
        return HaflState(owner_mean_scores(out.client_scores, out.update_masks, out.weights,
                                           algo_state.global_scores, beta=beta))

    def plan(state, client_ids, round_idx):
        ids = np.asarray(client_ids)
        ranks = ranks_of(ids)
        if round_idx == 0:
            m = _start_masks(first_round_init, ranks, ids, r_max, ctx.seed, round_idx)
            masks = {k: m for k in keys}
        else:
            masks = {k: np.asarray(v) for k, v in
                     rank_rules.hafl_truncation_masks(state.algo.global_scores, jnp.asarray(ranks)).items()}
        return ClientPlan(masks, masks)

    return Algorithm(name="hafl", aggregator=aggregator, plan=plan, client=client, init=init,
                     server_update=server_update, options=options)
