"""Run any registered algorithm for a few rounds on the tiny functional model (no files).

The same loop as the driver, minus data loading: ``plan -> make_spec -> round -> observe``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import tiny

from fedlora_jax import devices as dev_lib
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import AlgoContext, RoundReport, build_algorithm
from fedlora_jax.federated import init_server_state, make_round, make_spec, round_key

R = 4
POPULATION = 6


def model_shape() -> dev_lib.ModelShape:
    """A cost-model shape for the tiny model (3 layers of one ``fc`` module, D=8)."""
    return dev_lib.ModelShape(num_layers=tiny.L, hidden=tiny.D, intermediate=4 * tiny.D, heads=2, vocab=tiny.V,
                              seq_len=5, modules={"fc": (tiny.D, tiny.D)}, num_labels=tiny.K_CLASSES)


def context(*, rounds=4, ranks=(1, 2, 4), aggregator_options=None, devices=("jetson_agx_orin_64gb",
            "raspberry_pi_5_8gb"), deadline_s=None, seed=0) -> AlgoContext:
    keys = tuple(tiny.keys())
    profiles = tuple(dev_lib.get_profile(d) for d in devices)
    return AlgoContext(keys=keys, layer_of_key={k: i for i, k in enumerate(keys)}, num_layers=tiny.L, r_max=R,
                       client_ranks=np.array([ranks[i % len(ranks)] for i in range(POPULATION)], np.int32),
                       client_devices=np.array([i % len(profiles) for i in range(POPULATION)], np.int32),
                       rounds=rounds, scale=0.5, aggregator_options=dict(aggregator_options or {}), seed=seed,
                       device_profiles=profiles, model_shape=model_shape(), batch_size=4, local_steps=3,
                       deadline_s=deadline_s)


def init_lora(scheme: str, seed: int = 0):
    return lora_lib.init(jax.random.fold_in(jax.random.key(seed), 3), tiny.shapes(), R, scheme=scheme, std=0.2)


def run(name: str, *, rounds=4, options=None, clients_per_round=3, lr=5e-2, seed=0, ctx=None, round_fn=None,
        speed=None, return_history=False, **ctx_kw):
    """Run ``rounds`` rounds of algorithm ``name``; returns ``(state, metrics_per_round, round_fn)``.

    ``speed``: optional ``[POPULATION]`` true-speed factors of the simulated devices (the
    devices report compute times at that speed; drives ``observe``).
    """
    ctx = context(rounds=rounds, seed=seed, **ctx_kw) if ctx is None else ctx
    algo = build_algorithm(name, ctx, **(options or {}))
    key = jax.random.key(seed)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    state = init_server_state(init_lora(algo.init_scheme, seed), head, algo, num_clients=POPULATION)
    rf = round_fn if round_fn is not None else make_round(tiny.TASK, algo, optimizer=optax.adam(lr),
                                                          chunk_size=2)
    table = dev_lib.stack_profiles(list(ctx.device_profiles))
    history = []
    for r in range(rounds):
        ids = np.sort(np.random.default_rng([seed, r]).choice(POPULATION, clients_per_round, replace=False))
        ids = ids.astype(np.int32)
        plan = algo.plan(state, ids, r)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, depth_mask=plan.depth_mask,
                         global_masks=plan.global_masks, num_steps=[3] * len(ids),
                         weight=np.arange(1, len(ids) + 1, dtype=np.float32), client_id=ids,
                         num_layers=tiny.L, layer_of_key=ctx.layer_of_key,
                         device_id=ctx.client_devices[ids])
        data = tiny.batches(jax.random.fold_in(key, 100 + r), len(ids), 3, 4)
        state, m = rf(state, data, spec, round_key(seed, r), base)
        if algo.observe is not None:
            state = state._replace(algo=algo.observe(state.algo, report(ctx, table, spec, ids, speed)))
        history.append((plan, jax.device_get(m)))
    return (state, history, rf) if return_history else (state, [h[1] for h in history], rf)


def report(ctx, table, spec, ids, speed=None) -> RoundReport:
    """What the sampled devices report: cost-model FLOPs at their true ``speed`` (default 1)."""
    ranks = dev_lib.ranks_from_masks({k: np.asarray(v) for k, v in spec.update_masks.items()}, ctx.model_shape)
    flops = np.asarray(dev_lib.client_flops(np.asarray(ranks), np.asarray(spec.grad_cut), ctx.model_shape,
                                            batch=ctx.batch_size, steps=ctx.local_steps), np.float64)
    devs = dev_lib.take_devices(table, ctx.client_devices[ids])
    factors = np.ones(len(ids)) if speed is None else np.asarray(speed, np.float64)[ids]
    nbytes = np.full(len(ids), 1e5)
    t = dev_lib.measure_round(flops, nbytes, nbytes, devs, factors)
    return RoundReport(ids, ctx.client_devices[ids], np.ones(len(ids), bool), flops, t.compute_s, nbytes, t.up_s,
                       nbytes, t.down_s)


def leaves_differ(x, y) -> bool:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    if len(lx) != len(ly):
        return True
    return any(np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(lx, ly, strict=True))


__all__ = ["POPULATION", "R", "context", "init_lora", "jnp", "leaves_differ", "model_shape", "report", "run"]
