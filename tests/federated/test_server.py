"""The server half of a round (:mod:`fedlora_jax.federated.server`) on its own.

- Non-finite clients are dropped with weight 0 and counted only where they had weight: a
  padding (weight-0) client with NaN is not reported as dropped.
- ``server_round_update`` equals a hand-written reference (FedAvg of the finite clients).
- The round's server stage is this function: ``make_round`` gives what the server half gives
  on the round's own client outputs (``return_client_models``), and the driver's
  ``client_start`` is the algorithm's distribute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import algo_rounds, tiny

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms import build_algorithm
from fedlora_jax.federated import (
    ClientOutput,
    client_start,
    distribute_clients,
    gather_clients,
    init_server_state,
    make_round,
    make_spec,
    round_key,
    server_round_update,
)

R = algo_rounds.R


def _case(weights, nan_rows):
    lora = algo_rounds.init_lora("a_random_b_zero")
    head = tiny.init_head(jax.random.key(2))
    agg = agg_lib.fedit()
    state = init_server_state(lora, head, agg)
    c = len(weights)
    masks = {k: np.ones((c, R), np.float32) for k in lora}
    spec = make_spec(masks, num_steps=[1] * c, weight=np.asarray(weights, np.float32), client_id=np.arange(c),
                     num_layers=tiny.L)
    starts = distribute_clients(agg, state, spec.masks, ())
    keys = jax.random.split(jax.random.key(5), c)
    trained = jax.tree.map(lambda s: s + 0.1 * jax.vmap(lambda k: jax.random.normal(k, s.shape[1:]))(keys), starts)
    bad = jnp.zeros((c,), bool).at[jnp.asarray(nan_rows, jnp.int32)].set(True)
    trained = jax.tree.map(lambda x: jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.nan, x), trained)
    heads = jax.tree.map(lambda x: jnp.broadcast_to(x, (c,) + x.shape), head)
    outs = ClientOutput(trained, heads, {}, jnp.ones((c,)), jnp.zeros((c,)), jnp.full((c,), 4.0), jnp.ones((c,)))
    return agg, state, outs, starts, spec


def test_nonfinite_dropped_and_counted_only_where_weighted():
    agg, state, outs, starts, spec = _case([1.0, 2.0, 1.0, 0.0], nan_rows=[1, 3])
    update = jax.jit(server_round_update, static_argnums=0)(agg, state, outs, starts, spec, ())
    assert int(update.metrics["num_dropped_nonfinite"]) == 1  # client 3 had weight 0: padding, not a drop
    np.testing.assert_array_equal(update.metrics["client_weight"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(update.metrics["client_finite"], [True, False, True, False])
    want = jax.tree.map(lambda x: 0.5 * (x[0] + x[2]), outs.lora)  # FedAvg of the finite, weighted ones
    for k in want:
        np.testing.assert_allclose(update.state.lora[k].a, want[k].a, rtol=1e-6)
        np.testing.assert_allclose(update.state.lora[k].b, want[k].b, rtol=1e-6, atol=1e-7)


def test_round_server_stage_is_the_server_half():
    """One round of FedSA (per-client state) through ``make_round``; the server half applied to
    that round's own client results (before screening: all finite) gives the same state."""
    ctx = algo_rounds.context()
    algo = build_algorithm("fedsa", ctx)
    lora = algo_rounds.init_lora(algo.init_scheme)
    key = jax.random.key(0)
    base, head = tiny.init_base(jax.random.fold_in(key, 1)), tiny.init_head(jax.random.fold_in(key, 2))
    state = init_server_state(lora, head, algo, num_clients=algo_rounds.POPULATION)
    ids = np.array([0, 2, 5], np.int32)
    plan = algo.plan(state, ids, 0)
    spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=[3] * 3,
                     weight=np.array([1.0, 2.0, 3.0], np.float32), client_id=ids, num_layers=tiny.L,
                     layer_of_key=ctx.layer_of_key)
    rf = make_round(tiny.TASK, algo, optimizer=optax.adam(5e-2), chunk_size=2, return_client_models=True)
    new, m = rf(state, tiny.batches(jax.random.fold_in(key, 9), 3, 3, 4), spec, round_key(0, 0), base)
    assert rf.trace_count() == 1
    own = gather_clients(state.clients, spec.client_id)
    starts = distribute_clients(algo, state, spec.masks, own)
    outs = ClientOutput(m["client_lora"], m["client_head"], m["client_scores"], m["client_loss"],
                        m["client_accuracy"] * m["client_examples"], m["client_examples"], m["client_steps"])
    again = server_round_update(algo, state, outs, starts, spec, own).state
    for u, v in zip(jax.tree.leaves((new.lora, new.head, new.clients)), jax.tree.leaves((again.lora, again.head,
                                                                                          again.clients)),
                    strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    for i, cid in enumerate(ids.tolist()):  # the driver's view of what one client receives
        one = client_start(algo, new, {k: v[i] for k, v in spec.masks.items()}, cid)
        both = distribute_clients(algo, new, spec.masks, gather_clients(new.clients, spec.client_id))
        for u, v in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], both)), strict=True):
            np.testing.assert_array_equal(u, v)
