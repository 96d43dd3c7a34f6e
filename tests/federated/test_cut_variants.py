"""Per-chunk static gradient cuts (``make_round(cut_variants=...)``): the same values and
gradients as the dynamic cut, bit for bit on CPU, fewer compiled FLOPs with the depth, one
compilation across rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import algo_rounds as ar
from helpers import tiny

from fedlora_jax import aggregation as ag
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import ClientOptions
from fedlora_jax.federated import client_update, init_server_state, make_round, make_spec, round_key
from fedlora_jax.federated.round import _task_above, layer_of_key

R, S, B = ar.R, 3, 4


def _depth_spec(depths, ids, ranks=None):
    """Clients whose adapters sit on their top ``depth`` layers (LEGEND placement)."""
    c = len(depths)
    ranks = ranks or [R] * c
    masks = {}
    for k in tiny.keys():
        layer = layer_of_key(k)
        masks[k] = np.stack([lora_lib.rank_mask(r if layer >= tiny.L - d else 0, R) for d, r in zip(depths, ranks,
                                                                                                 strict=True)])
    return make_spec(masks, num_steps=[S] * c, weight=np.arange(1, c + 1, dtype=np.float32),
                     client_id=np.asarray(ids, np.int32), num_layers=tiny.L,
                     layer_of_key={k: layer_of_key(k) for k in tiny.keys()})


def _setup(seed=0):
    key = jax.random.key(seed)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    lora = lora_lib.init(jax.random.fold_in(key, 3), tiny.shapes(), R, std=0.3)
    lora = {k: f._replace(b=0.1 * jax.random.normal(jax.random.fold_in(key, 7 + i), f.b.shape))
            for i, (k, f) in enumerate(sorted(lora.items()))}
    return base, init_server_state(lora, head, ag.replication_padding())


def _rounds(rf, base, state, plans):
    out = []
    for r, (depths, ids) in enumerate(plans):
        spec = _depth_spec(depths, ids, ranks=[(1, 2, 4)[i % 3] for i in range(len(depths))])
        data = tiny.batches(jax.random.fold_in(jax.random.key(5), r), len(depths), S, B)
        state, m = rf(state, data, spec, round_key(0, r), base)
        out.append((state, jax.device_get(m)))
    return out


PLANS = [([1, 3, 2, 1, 3], [4, 0, 2, 1, 3]),        # unsorted depths, C=5 with chunk 2 (padding)
         ([2, 2, 1, 3, 1], [0, 1, 2, 3, 4]),
         ([1, 1, 1, 1, 1], [4, 3, 2, 1, 0])]


@pytest.mark.parametrize("variants", [(1, 2), (2,), (1,)])
def test_cut_variants_equal_the_dynamic_cut_bit_for_bit(variants):
    base, state = _setup()
    plain = make_round(tiny.TASK, ag.replication_padding(), optimizer=optax.adamw(0.05, weight_decay=0.01),
                       chunk_size=2)
    fast = make_round(tiny.TASK, ag.replication_padding(), optimizer=optax.adamw(0.05, weight_decay=0.01),
                      chunk_size=2, cut_variants=variants)
    for (s1, m1), (s2, m2) in zip(_rounds(plain, base, state, PLANS), _rounds(fast, base, state, PLANS), strict=True):
        for x, y in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert fast.trace_count() == 1                    # three depth mixes, one program


def test_gradients_through_a_variant_equal_the_dynamic_cut():
    """The client gradient of a shallow client, computed by the skipping task, equals the
    dynamic cut's (zeros below the cut included)."""
    base, state = _setup()
    spec = jax.tree.map(lambda x: x[0], _depth_spec([1], [0]))
    batch = jax.tree.map(lambda x: x[0, 0], tiny.batches(jax.random.key(1), 1, 1, B))
    tr = {"lora": state.lora, "head": state.head}

    def grads(task):
        return jax.grad(lambda t: task.loss(t, base, batch, spec.masks, spec.grad_cut, None)[0])(tr)

    g_dyn, g_cut = grads(tiny.TASK), grads(_task_above(tiny.TASK, 2))
    for x, y in zip(jax.tree.leaves(g_dyn), jax.tree.leaves(g_cut), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(jnp.abs(g_cut["lora"]["layer.0.fc"].a).max()) == 0.0
    assert float(jnp.abs(g_cut["lora"]["layer.2.fc"].a).max()) > 0.0


def test_compiled_flops_fall_with_the_cut():
    """XLA cost analysis of one client's local training under each variant: the backward of
    the layers below the cut is gone from the program."""
    base, state = _setup()
    spec = jax.tree.map(lambda x: x[0], _depth_spec([1], [0]))
    batches = jax.tree.map(lambda x: x[0], tiny.batches(jax.random.key(1), 1, S, B))
    tr = {"lora": state.lora, "head": state.head}
    opts = ClientOptions()
    flops = []
    for cut in range(tiny.L):
        fn = jax.jit(lambda t, b, task=_task_above(tiny.TASK, cut): client_update(
            task, optax.adam(0.1), opts, t, base, b, spec, jax.random.key(0)).lora)
        cost = fn.lower(tr, batches).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops.append(float(cost["flops"]))
    assert all(a > b for a, b in zip(flops, flops[1:], strict=False)), flops


def test_cut_variant_validation():
    with pytest.raises(ValueError, match="not both"):
        make_round(tiny.TASK, ag.fedit(), static_grad_cut=1, cut_variants=(1,))
    with pytest.raises(ValueError, match="ints >= 0"):
        make_round(tiny.TASK, ag.fedit(), cut_variants=(-1,))
    assert layer_of_key("layer.12.query") == 12 and layer_of_key("pooler") is None
