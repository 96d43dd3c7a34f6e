"""Per-client state on the host (``client_state_on_host``): the same numbers as on the device,
only the sampled slices travel, one compilation, and a size estimate from shapes alone."""

import jax
import numpy as np
import optax
import pytest
from helpers import algo_rounds as ar
from helpers import tiny

from fedlora_jax.algorithms import build_algorithm
from fedlora_jax.federated import init_server_state, make_round, make_spec, round_key
from fedlora_jax.federated.round import population_state_bytes

K = 50


def _run(name, host, rounds=3, options=None):
    ctx = ar.context(rounds=rounds)._replace(client_ranks=np.array([(1, 2, 4)[i % 3] for i in range(K)], np.int32),
                                              client_devices=np.zeros(K, np.int32))
    algo = build_algorithm(name, ctx, **(options or {}))
    key = jax.random.key(0)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    state = init_server_state(ar.init_lora(algo.init_scheme), tiny.init_head(jax.random.fold_in(key, 2)), algo,
                              num_clients=K, client_state_on_host=host)
    rf = make_round(tiny.TASK, algo, optimizer=optax.adam(0.05), chunk_size=2, client_state_on_host=host)
    for r in range(rounds):
        ids = np.sort(np.random.default_rng([1, r]).choice(K, 3, replace=False)).astype(np.int32)
        plan = algo.plan(state, ids, r)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=[3] * 3,
                         weight=np.array([1.0, 2.0, 0.0] if r == 1 else [1.0, 2.0, 3.0], np.float32),
                         client_id=ids, num_layers=tiny.L, layer_of_key=ctx.layer_of_key)
        state, _ = rf(state, tiny.batches(jax.random.fold_in(key, 100 + r), 3, 3, 4), spec, round_key(0, r), base)
    return state, rf, algo


@pytest.mark.parametrize("name, options", [("fedsa", None), ("hafl", {"mode": "freeze"})])
def test_host_state_equals_device_state(name, options):
    dev, _, algo = _run(name, False, options=options)
    host, rf, _ = _run(name, True, options=options)
    assert rf.trace_count() == 1
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.clients))
    for x, y in zip(jax.tree.leaves(dev), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert population_state_bytes(algo, dev.lora, K) == sum(np.asarray(x).nbytes for x in jax.tree.leaves(host.clients))


def test_population_bytes_is_zero_without_client_state():
    algo = build_algorithm("fedit", ar.context())
    assert population_state_bytes(algo, ar.init_lora(algo.init_scheme), 10_000) == 0
