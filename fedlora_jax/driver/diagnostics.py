"""Paper diagnostics a run can log: Byun & Lee's first-round dilution (the highest-rank client's
own model before the aggregation vs the model it receives after), HAFL's accuracy at distribution
per client rank, and the norm each rank slot of the global adapter carries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.federated import ServerState, client_start, effective_base


def first_round_diagnostic(setup, before: ServerState, after: ServerState, spec, metrics, evaluate,
                           test_batches) -> dict | None:
    """Test accuracy of the highest-rank participating client's own model just before the
    aggregation and of the model it receives just after (Byun & Lee's dilution diagnostic).

    Returns ``{"client", "rank", "local_accuracy", "after_aggregation_accuracy"}`` or ``None``
    when no client took part.
    """
    weights = np.asarray(metrics["client_weight"])
    if not np.any(weights > 0):
        return None
    ranks = np.stack([np.asarray(v).sum(-1) for v in spec.update_masks.values()]).max(0)
    pos = int(np.argmax(np.where(weights > 0, ranks, -1)))
    masks = {k: jnp.asarray(v[pos]) for k, v in spec.masks.items()}
    own_lora = jax.tree.map(lambda x: x[pos], metrics["client_lora"])
    own_head = jax.tree.map(lambda x: x[pos], metrics["client_head"])
    base_before = effective_base(setup.task, setup.base, before.agg_state)
    local = evaluate(base_before, own_head, own_lora, masks, test_batches)[0]
    received = client_start(setup.algo, after, masks, int(spec.client_id[pos]))
    base_after = effective_base(setup.task, setup.base, after.agg_state)
    merged = evaluate(base_after, after.head, received, masks, test_batches)[0]
    return {"client": int(spec.client_id[pos]), "rank": int(ranks[pos]), "local_accuracy": float(local),
            "after_aggregation_accuracy": float(merged)}



def global_slot_norms(lora) -> list[float]:
    """``[R]``: per rank slot ``i``, the sum over modules of ``|e_i| ||a[:, i]|| ||b[i, :]||`` (the
    norm of the slot's rank-1 component; how much each slot of the global adapter carries)."""
    total = 0.0
    for f in lora.values():
        norm = jnp.linalg.norm(f.a, axis=0) * jnp.linalg.norm(f.b, axis=1)
        total = total + (norm if f.e is None else norm * jnp.abs(f.e))
    return np.asarray(total, np.float64).round(6).tolist()



def distributed_accuracies(setup, state: ServerState, evaluate, test_batches) -> dict[str, float]:
    """``{rank: accuracy}`` of the model a client of each of ``cfg.eval_distributed_ranks``
    receives from ``state``: the algorithm's plan and distribute for the population's first
    client of that rank (HAFL's "degradation at distribution")."""
    out = {}
    base = effective_base(setup.task, setup.base, state.agg_state)
    for rank in setup.cfg.eval_distributed_ranks:
        cid = int(np.flatnonzero(setup.ctx.client_ranks == rank)[0])
        plan = setup.algo.plan(state, np.array([cid]), int(state.round))
        masks = {k: jnp.asarray(v[0]) for k, v in plan.masks.items()}
        received = client_start(setup.algo, state, masks, cid)
        out[str(rank)] = float(evaluate(base, state.head, received, masks, test_batches)[0])
    return out
