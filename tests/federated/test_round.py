"""The compiled round equals a Python loop over clients; masks are exact; one compile."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny

from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import ClientOptions
from fedlora_jax.federated import client_update, init_server_state, make_round, make_spec

R = 4
TOL_F32 = dict(rtol=2e-5, atol=2e-6)  # written down once: chunked/vmapped vs loop, float32


def fedavg_aggregator():
    """Masked FedAvg of factors (zero padding), the engine's reference aggregator."""

    def aggregate(glob, clients, weights, masks, state, *, extras=None):
        w = weights / jnp.maximum(jnp.sum(weights), 1e-30)
        out = {}
        for k, f in clients.items():
            a = jnp.einsum("c,cnr->nr", w, f.a)
            b = jnp.einsum("c,crm->rm", w, f.b)
            out[k] = lora_lib.LoraFactors(a, b)
        return jax.tree.map(lambda n, o: jnp.where(jnp.sum(weights) > 0, n, o), out, glob), state

    def distribute(glob, masks, state):
        return lora_lib.apply_masks(glob, masks)

    return SimpleNamespace(name="test_fedavg", init=lambda g: (), aggregate=aggregate,
                           distribute=distribute, uplink_parts=("a", "b"), downlink_parts=("a", "b"))


def setup(c=5, s=3, b=4, seed=0):
    key = jax.random.key(seed)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    glob = lora_lib.init(jax.random.fold_in(key, 3), tiny.shapes(), R, std=0.2)
    glob = {k: lora_lib.LoraFactors(f.a, 0.1 * jax.random.normal(jax.random.fold_in(key, 9 + i), f.b.shape))
            for i, (k, f) in enumerate(sorted(glob.items()))}
    data = tiny.batches(jax.random.fold_in(key, 4), c, s, b)
    return base, head, glob, data


def specs_for(c, ranks, steps, weights, layer_ranks=None):
    masks = {}
    for i, k in enumerate(tiny.keys()):
        rr = ranks if layer_ranks is None else layer_ranks[i]
        masks[k] = np.stack([np.arange(R) < r for r in rr]).astype(np.float32)
    return make_spec(masks, num_steps=steps, weight=weights, client_id=np.arange(c) + 10,
                     num_layers=tiny.L, layer_of_key={k: i for i, k in enumerate(tiny.keys())})


def loop_reference(base, head, glob, data, spec, key, opt):
    """Plain Python loop over clients: the definition the compiled round must equal."""
    agg = fedavg_aggregator()
    cfg = ClientOptions()
    c = spec.weight.shape[0]
    outs = []
    for i in range(c):
        sp = jax.tree.map(lambda x: x[i], spec)
        start = agg.distribute(glob, sp.masks, ())
        b = jax.tree.map(lambda x: x[i], data)
        ck = jax.random.fold_in(key, sp.client_id)
        outs.append(client_update(tiny.TASK, opt, cfg, {"lora": start, "head": head}, base, b, sp, ck))
    w = np.asarray(spec.weight) / np.sum(spec.weight)
    new = {}
    for k in glob:
        a = sum(w[i] * np.asarray(outs[i].lora[k].a, np.float64) for i in range(c))
        bb = sum(w[i] * np.asarray(outs[i].lora[k].b, np.float64) for i in range(c))
        new[k] = (a, bb)
    new_head = {n: sum(w[i] * np.asarray(outs[i].head[n], np.float64) for i in range(c)) for n in head}
    return new, new_head, outs


@pytest.mark.parametrize("chunk", [1, 2, 5, 8])
def test_round_equals_python_loop(chunk):
    c = 5
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[1, 2, 4, 3, 4], steps=[3, 1, 2, 3, 0], weights=[1.0, 2.0, 0.5, 3.0, 1.0])
    opt = optax.adamw(1e-2)
    agg = fedavg_aggregator()
    rf = make_round(tiny.TASK, agg, optimizer=opt, chunk_size=chunk)
    key = jax.random.key(42)
    state, metrics = rf(init_server_state(glob, head, agg), data, spec, key, base)
    ref, ref_head, outs = loop_reference(base, head, glob, data, spec, key, opt)
    for k in glob:
        np.testing.assert_allclose(np.asarray(state.lora[k].a), ref[k][0], **TOL_F32)
        np.testing.assert_allclose(np.asarray(state.lora[k].b), ref[k][1], **TOL_F32)
    for n in head:
        np.testing.assert_allclose(np.asarray(state.head[n]), ref_head[n], **TOL_F32)
    np.testing.assert_allclose(np.asarray(metrics["client_loss"]), [float(o.loss) for o in outs], **TOL_F32)
    assert int(state.round) == 1


def test_padding_clients_do_not_change_result():
    c = 3
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[2, 4, 1], steps=[2, 3, 3], weights=[1.0, 1.0, 2.0])
    agg = fedavg_aggregator()
    key = jax.random.key(1)
    s1, _ = make_round(tiny.TASK, agg, optimizer=optax.sgd(0.1), chunk_size=3)(
        init_server_state(glob, head, agg), data, spec, key, base)
    s2, _ = make_round(tiny.TASK, agg, optimizer=optax.sgd(0.1), chunk_size=2)(
        init_server_state(glob, head, agg), data, spec, key, base)
    for k in glob:
        np.testing.assert_allclose(np.asarray(s1.lora[k].a), np.asarray(s2.lora[k].a), **TOL_F32)
        np.testing.assert_allclose(np.asarray(s1.lora[k].b), np.asarray(s2.lora[k].b), **TOL_F32)


def test_one_compile_for_different_ranks_depths_steps():
    c = 4
    base, head, glob, data = setup(c)
    agg = fedavg_aggregator()
    rf = make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=2)
    state = init_server_state(glob, head, agg)
    configs = [
        dict(ranks=[1, 2, 3, 4], steps=[3, 3, 3, 3], weights=[1, 1, 1, 1]),
        dict(ranks=[4, 4, 1, 0], steps=[1, 2, 0, 3], weights=[2, 1, 0, 1]),
        dict(ranks=None, layer_ranks=[[0, 0, 1, 4], [2, 0, 4, 4], [4, 4, 4, 4]], steps=[2, 2, 2, 1],
             weights=[1, 1, 1, 1]),
    ]
    for r, cfg in enumerate(configs):
        spec = specs_for(c, cfg["ranks"], cfg["steps"], cfg["weights"], cfg.get("layer_ranks"))
        state, _ = rf(state, data, spec, jax.random.fold_in(jax.random.key(0), r), base)
    assert rf.trace_count() == 1


def test_masked_slots_and_frozen_components_unchanged_bitwise():
    c = 3
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[2, 4, 3], steps=[3, 3, 3], weights=[1, 1, 1])
    # Freeze slot 1 everywhere (HAFL-style update mask) while the forward mask keeps it.
    upd = {k: v * np.array([1, 0, 1, 1], np.float32) for k, v in spec.masks.items()}
    spec = spec._replace(update_masks=upd)
    agg = fedavg_aggregator()
    cfg = ClientOptions()
    opt = optax.adamw(1e-1, weight_decay=0.5)
    for i in range(c):
        sp = jax.tree.map(lambda x: x[i], spec)
        start = agg.distribute(glob, sp.masks, ())
        out = client_update(tiny.TASK, opt, cfg, {"lora": start, "head": head}, base,
                            jax.tree.map(lambda x: x[i], data), sp, jax.random.key(i))
        for k in glob:
            u = np.asarray(sp.update_masks[k])
            a0, b0 = np.asarray(start[k].a), np.asarray(start[k].b)
            a1, b1 = np.asarray(out.lora[k].a), np.asarray(out.lora[k].b)
            np.testing.assert_array_equal(a1[:, u == 0], a0[:, u == 0])
            np.testing.assert_array_equal(b1[u == 0, :], b0[u == 0, :])
            assert np.any(a1[:, u == 1] != a0[:, u == 1])


def test_depth_mask_layers_below_cut_unchanged():
    c = 2
    base, head, glob, data = setup(c)
    # Client 0 trains only the top layer; client 1 all layers.
    spec = specs_for(c, ranks=None, layer_ranks=[[0, 4], [0, 4], [4, 4]], steps=[3, 3], weights=[1, 1])
    assert list(np.asarray(spec.grad_cut)) == [2, 0]
    agg = fedavg_aggregator()
    sp = jax.tree.map(lambda x: x[0], spec)
    start = agg.distribute(glob, sp.masks, ())
    out = client_update(tiny.TASK, optax.adam(1e-1), ClientOptions(), {"lora": start, "head": head},
                        base, jax.tree.map(lambda x: x[0], data), sp, jax.random.key(0))
    for k in ("layer.0.fc", "layer.1.fc"):
        np.testing.assert_array_equal(np.asarray(out.lora[k].a), np.asarray(start[k].a))
        np.testing.assert_array_equal(np.asarray(out.lora[k].b), np.asarray(start[k].b))
    assert np.any(np.asarray(out.lora["layer.2.fc"].a) != np.asarray(start["layer.2.fc"].a))


def test_zero_steps_client_is_exact_noop():
    c = 2
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[4, 4], steps=[0, 2], weights=[1, 1])
    agg = fedavg_aggregator()
    sp = jax.tree.map(lambda x: x[0], spec)
    start = agg.distribute(glob, sp.masks, ())
    out = client_update(tiny.TASK, optax.adamw(1e-1), ClientOptions(), {"lora": start, "head": head},
                        base, jax.tree.map(lambda x: x[0], data), sp, jax.random.key(0))
    for k in glob:
        np.testing.assert_array_equal(np.asarray(out.lora[k].a), np.asarray(start[k].a))
    for n in head:
        np.testing.assert_array_equal(np.asarray(out.head[n]), np.asarray(head[n]))


def test_nonfinite_client_dropped_and_reported():
    c = 3
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[4, 4, 4], steps=[2, 2, 2], weights=[1, 1, 1])
    agg = fedavg_aggregator()
    # Inject a NaN into client 1's inputs through the embedding: poison its token ids' rows.
    base_nan = dict(base)
    clean_ids = data["input_ids"] % (tiny.V - 1)  # no client uses the poisoned row...
    poison_ids = clean_ids.at[1].set(tiny.V - 1)  # ...except client 1
    base_nan["embed"] = base["embed"].at[tiny.V - 1].set(jnp.nan)
    data_nan = dict(data, input_ids=poison_ids)
    rf = make_round(tiny.TASK, agg, optimizer=optax.sgd(0.1), chunk_size=3)
    state, m = rf(init_server_state(glob, head, agg), data_nan, spec, jax.random.key(0), base_nan)
    assert list(np.asarray(m["client_finite"])) == [True, False, True]
    assert int(m["num_dropped_nonfinite"]) == 1
    for k in glob:
        assert np.all(np.isfinite(np.asarray(state.lora[k].a))) and np.all(np.isfinite(np.asarray(state.lora[k].b)))
    # Equals the round run with client 1 at weight 0.
    spec0 = spec._replace(weight=np.array([1, 0, 1], np.float32))
    ref, _ = rf(init_server_state(glob, head, agg), dict(data, input_ids=clean_ids), spec0, jax.random.key(0), base)
    for k in glob:
        np.testing.assert_allclose(np.asarray(state.lora[k].a), np.asarray(ref.lora[k].a), **TOL_F32)


def test_bytes_from_masks():
    """The one communication count (``aggregation.round_bytes``): up over the update masks, down
    over the forward masks, plus the head both ways."""
    from fedlora_jax.aggregation import round_bytes

    c = 2
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[1, 3], steps=[1, 1], weights=[1, 1])
    full = {k: np.ones_like(v) for k, v in spec.masks.items()}
    agg = fedavg_aggregator()
    up, down = round_bytes(agg, glob, head, spec.update_masks, full)
    per_rank = tiny.L * (tiny.D + tiny.D)
    head_params = sum(int(np.size(x)) for x in jax.tree.leaves(head))
    np.testing.assert_array_equal(up, [4 * (1 * per_rank + head_params), 4 * (3 * per_rank + head_params)])
    np.testing.assert_array_equal(down, [4 * (4 * per_rank + head_params)] * 2)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        make_round(tiny.TASK, fedavg_aggregator(), chunk_size=0)


def test_make_spec_validation():
    with pytest.raises(ValueError, match="weight"):
        make_spec({"x": np.ones((2, 4))}, num_steps=[1, 1], weight=[1, -1], client_id=[0, 1], num_layers=1)
    with pytest.raises(ValueError, match="masks"):
        make_spec({"x": np.ones((3, 4))}, num_steps=[1, 1], weight=[1, 1], client_id=[0, 1], num_layers=1)
    with pytest.raises(ValueError, match="num_steps"):
        make_spec({"x": np.ones((2, 4))}, num_steps=[1], weight=[1, 1], client_id=[0, 1], num_layers=1)


def test_fedsa_personal_b_stays_local_and_returns():
    from fedlora_jax.algorithms import fedsa
    from fedlora_jax.algorithms.base import AlgoContext

    c = 2
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[4, 4], steps=[2, 2], weights=[1, 1])
    spec = spec._replace(client_id=np.array([1, 3], np.int32))
    k_total = 5
    ctx = AlgoContext(keys=tuple(tiny.keys()), layer_of_key={k: i for i, k in enumerate(tiny.keys())},
                      num_layers=tiny.L, r_max=R, client_ranks=np.full(k_total, R), client_devices=np.zeros(k_total, int),
                      rounds=1, scale=0.5)
    algo = fedsa.build(ctx)
    agg = algo.aggregator
    state = init_server_state(glob, head, algo, num_clients=k_total)
    personal = state.clients
    rf = make_round(tiny.TASK, algo, optimizer=optax.adam(1e-2), chunk_size=2)
    s1, _ = rf(state, data, spec, jax.random.key(0), base)
    # Reference: each client trains from (global a, its own b); its trained b is stored for it.
    for pos, cid in enumerate([1, 3]):
        sp = jax.tree.map(lambda x: x[pos], spec)
        start = agg.distribute(glob, sp.masks, (), client_lora=jax.tree.map(lambda x: x[cid], personal))
        out = client_update(tiny.TASK, optax.adam(1e-2), ClientOptions(), {"lora": start, "head": head},
                            base, jax.tree.map(lambda x: x[pos], data), sp, jax.random.fold_in(jax.random.key(0), cid))
        for k in glob:
            np.testing.assert_allclose(np.asarray(s1.clients[k].b[cid]), np.asarray(out.lora[k].b),
                                       **TOL_F32)
    for k in glob:
        # Non-participants keep their adapters; the server's b is never touched by FedSA.
        np.testing.assert_array_equal(np.asarray(s1.clients[k].b[0]), np.asarray(glob[k].b))
        np.testing.assert_array_equal(np.asarray(s1.lora[k].b), np.asarray(glob[k].b))
        assert np.any(np.asarray(s1.lora[k].a) != np.asarray(glob[k].a))


def test_static_grad_cut_same_result_fewer_flops():
    c = 3
    base, head, glob, data = setup(c, s=2, b=8)
    # Layers 0 and 1 carry no rank for anybody: the lowest active layer is 2.
    spec = specs_for(c, ranks=None, layer_ranks=[[0, 0, 0], [0, 0, 0], [4, 2, 3]], steps=[2, 2, 2],
                     weights=[1, 1, 1])
    assert list(np.asarray(spec.grad_cut)) == [2, 2, 2]
    agg = fedavg_aggregator()
    state = init_server_state(glob, head, agg)
    dyn = make_round(tiny.TASK, agg, optimizer=optax.sgd(0.1), chunk_size=3)
    sta = make_round(tiny.TASK, agg, optimizer=optax.sgd(0.1), chunk_size=3, static_grad_cut=2)
    args = (state, data, spec, jax.random.key(0), base)
    s1, _ = dyn(*args)
    s2, _ = sta(*args)
    for k in glob:
        np.testing.assert_allclose(np.asarray(s1.lora[k].a), np.asarray(s2.lora[k].a), **TOL_F32)
        np.testing.assert_allclose(np.asarray(s1.lora[k].b), np.asarray(s2.lora[k].b), **TOL_F32)

    def flops(rf):
        ca = rf.jitted.lower(*args).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return ca["flops"]

    assert flops(sta) < flops(dyn)
    with pytest.raises(ValueError, match="static_grad_cut"):
        make_round(tiny.TASK, agg, chunk_size=2, static_grad_cut=-1)


def test_update_scale_multiplies_one_factors_step():
    """``ClientOptions.update_scale`` scales the optimizer's update of one factor only (a per-factor
    learning rate): with SGD the lambda step is exactly 10x, a and b unchanged."""
    c = 1
    base, head, glob, data = setup(c)
    glob = {k: lora_lib.LoraFactors(f.a, f.b, jnp.full((R,), 0.3)) for k, f in glob.items()}
    spec = specs_for(c, ranks=[4], steps=[1], weights=[1])
    sp = jax.tree.map(lambda x: x[0], spec)
    batch = jax.tree.map(lambda x: x[0], data)
    run = lambda opts: client_update(tiny.TASK, optax.sgd(0.1), opts, {"lora": glob, "head": head}, base, batch,
                                     sp, jax.random.key(0))
    plain, scaled = run(ClientOptions()), run(ClientOptions(update_scale=(("e", 10.0),)))
    for k in glob:
        np.testing.assert_allclose(np.asarray(scaled.lora[k].e - glob[k].e),
                                   10 * np.asarray(plain.lora[k].e - glob[k].e), rtol=1e-5, atol=5e-7)  # f32 at 0.3
        np.testing.assert_array_equal(np.asarray(scaled.lora[k].a), np.asarray(plain.lora[k].a))
        assert np.any(np.asarray(plain.lora[k].e) != 0.3)
