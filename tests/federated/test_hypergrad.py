"""Gradients through whole rounds w.r.t. server hyperparameters (float64, central differences),
and the mixed-padding aggregator against its ends and a loop reference."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import algo_rounds as ar
from helpers import tiny

from fedlora_jax import aggregation as ag
from fedlora_jax import lora as lora_lib
from fedlora_jax import testing as kit
from fedlora_jax.algorithms import build_algorithm
from fedlora_jax.federated import (
    RoundInputs,
    ServerHyper,
    init_server_state,
    make_round,
    make_spec,
    round_key,
    run_rounds,
    with_client_weights,
)

R, C, S, B = ar.R, 3, 2, 4
SHAPES = {k: tiny.shapes()[k] for k in tiny.keys()}


# ----------------------------------------------------------------------------- mixed padding

def _case(dtype=jnp.float64, seed=0):
    glob, clients, w, masks, extras = kit.make_case(seed, shapes=SHAPES, r_max=R, ranks=(1, 2, 4), dtype=dtype)
    return glob, clients, w.astype(dtype), masks, extras


def _loop_reference(glob, clients, weights, masks, g, s):
    """Plain NumPy loops over modules, slots, clients: ``num_i * ((1 - g_i) + g_i / P_i)``."""
    p = np.asarray(weights, np.float64) / np.sum(weights)
    out = {}
    for k, gl in glob.items():
        a, b = np.array(gl.a, np.float64), np.array(gl.b, np.float64)
        m = np.asarray(masks[k])
        for i in range(R):
            w = [p[c] * s[c, i] * (m[c, i] != 0) for c in range(len(p))]
            tot = sum(w)
            if tot == 0:
                continue
            num_a = sum(w[c] * np.asarray(clients[k].a[c, :, i], np.float64) for c in range(len(p)))
            num_b = sum(w[c] * np.asarray(clients[k].b[c, i, :], np.float64) for c in range(len(p)))
            gain = (1 - g[i]) + g[i] / tot
            a[:, i], b[i, :] = num_a * gain, num_b * gain
        out[k] = (a, b)
    return out


def test_mixed_padding_ends_are_fedit_and_replication(x64):
    glob, clients, w, masks, _ = _case()
    for g, ref in ((0.0, ag.fedit()), (1.0, ag.replication_padding())):
        agg = ag.mixed_padding(pad_mix=g)
        got, _ = agg.aggregate(glob, clients, w, masks, agg.init(glob))
        want, _ = ref.aggregate(glob, clients, w, masks, ref.init(glob))
        for k in glob:
            np.testing.assert_allclose(got[k].a, want[k].a, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(got[k].b, want[k].b, rtol=1e-12, atol=1e-13)
        # the same end reached through the array hyperparameter
        got2, _ = agg.aggregate(glob, clients, w, masks, agg.init(glob),
                                extras={"hyper": ag.PaddingHyper(pad_mix=jnp.full((R,), g))})
        for k in glob:
            np.testing.assert_allclose(got2[k].a, want[k].a, rtol=1e-12, atol=1e-13)


def test_mixed_padding_matches_loop_reference(x64):
    glob, clients, w, masks, _ = _case(seed=2)
    rng = np.random.default_rng(0)
    g = rng.uniform(size=R)
    s = rng.uniform(0.2, 2.0, size=(len(w), R))
    agg = ag.mixed_padding()
    got, _ = agg.aggregate(glob, clients, w, masks, agg.init(glob),
                           extras={"hyper": ag.PaddingHyper(pad_mix=jnp.asarray(g), slot_weight=jnp.asarray(s))})
    want = _loop_reference(glob, clients, np.asarray(w), masks, g, s)
    for k in glob:
        np.testing.assert_allclose(got[k].a, want[k][0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got[k].b, want[k][1], rtol=1e-12, atol=1e-13)


def test_mixed_padding_passes_the_public_battery():
    kit.check_aggregator(ag.mixed_padding(pad_mix=0.5), shapes=SHAPES, r_max=R, ranks=(1, 2, 4, 3))


def test_mixed_padding_refuses_bad_inputs(x64):
    glob, clients, w, masks, _ = _case()
    with pytest.raises(ValueError, match="pad_mix"):
        ag.mixed_padding(pad_mix=1.5)
    agg = ag.mixed_padding()
    with pytest.raises(TypeError, match="PaddingHyper"):
        agg.aggregate(glob, clients, w, masks, agg.init(glob), extras={"hyper": {"pad_mix": 0.5}})
    with pytest.raises(ValueError, match="no entry for module"):
        agg.aggregate(glob, clients, w, masks, agg.init(glob),
                      extras={"hyper": ag.PaddingHyper(pad_mix={"layer.0.fc": 0.5})})


# ----------------------------------------------------------------------------- rounds

def _setup(algorithm="fedit", *, aggregator=None, optimizer=None, options=None, dtype=jnp.float64, seed=0,
           n_rounds=2):
    """A tiny population (K=6, ranks 1/2/4), ``n_rounds`` rounds of 3 clients, float64."""
    ctx = ar.context(rounds=n_rounds)
    algo = build_algorithm(algorithm, ctx, **(options or {}))
    if aggregator is not None:
        algo = algo._replace(aggregator=aggregator)
    key = jax.random.key(seed)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    lora = lora_lib.init(jax.random.fold_in(key, 3), SHAPES, R, scheme=algo.init_scheme, std=0.3, dtype=dtype)
    # non-zero b so the first round's aggregate depends on every factor
    lora = {k: f._replace(b=0.2 * jax.random.normal(jax.random.fold_in(key, 9 + i), f.b.shape, dtype))
            for i, (k, f) in enumerate(sorted(lora.items()))}
    state = init_server_state(lora, head, algo, num_clients=ar.POPULATION)
    rf = make_round(tiny.TASK, algo, optimizer=optimizer or optax.sgd(0.3), chunk_size=2)
    rounds = []
    st = state
    for r in range(n_rounds):
        ids = np.array([[0, 2, 4], [1, 3, 5]][r % 2], np.int32)
        plan = algo.plan(st, ids, r)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=[S] * C,
                         weight=np.ones(C, np.float64), client_id=ids, num_layers=tiny.L,
                         layer_of_key=ctx.layer_of_key)
        rounds.append(RoundInputs(tiny.batches(jax.random.fold_in(key, 100 + r), C, S, B), spec, round_key(seed, r)))
    val = jax.tree.map(lambda x: x[0, 0], tiny.batches(jax.random.fold_in(key, 999), 1, 1, 16))
    return rf, state, rounds, base, val


def _val_loss(state, base, val):
    """Held-out cross-entropy of the global model (every slot on)."""
    full = {k: jnp.ones((R,), f.a.dtype) for k, f in state.lora.items()}
    logits = tiny.forward(base, state.head, state.lora, full, val["input_ids"], val["attention_mask"], 0)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, val["labels"]))


def _objective(rf, state, rounds, base, val, *, n, remat=False, with_pad=True):
    """``theta -> validation loss after n rounds`` and a starting ``theta``."""

    def f(theta):
        hyper = ServerHyper(server_lr=theta["lr"],
                            aggregation=ag.PaddingHyper(pad_mix=theta["g"], slot_weight=theta["s"]) if with_pad
                            else None)
        inputs = [r._replace(specs=with_client_weights(r.specs, theta["w"])) for r in rounds[:n]]
        out, _ = run_rounds(rf, state, inputs, base, hyper, remat=remat)
        return _val_loss(out, base, val)

    theta = {"w": jnp.array([1.0, 0.5, 2.0, 1.5, 0.7, 1.2]), "lr": jnp.array(0.8),
             "g": jnp.array([0.2, 0.5, 0.7, 0.9]), "s": jnp.array([[1.0, 0.8, 1.3, 0.6],
                                                                  [0.9, 1.1, 0.7, 1.4],
                                                                  [1.2, 0.5, 1.0, 0.9]])}
    if not with_pad:
        theta = {k: theta[k] for k in ("w", "lr")}
    return f, theta


def _check_fd(f, theta, *, h=1e-6, rtol=1e-5, atol=1e-9):
    grad = jax.grad(f)(theta)
    flat, unravel = jax.flatten_util.ravel_pytree(theta)
    g_flat, _ = jax.flatten_util.ravel_pytree(grad)
    fd = np.array([(f(unravel(flat.at[i].add(h))) - f(unravel(flat.at[i].add(-h)))) / (2 * h)
                   for i in range(flat.size)])
    np.testing.assert_allclose(np.asarray(g_flat), fd, rtol=rtol, atol=atol)
    assert np.abs(fd).max() > 1e-4            # the check is not vacuous
    return grad


@pytest.mark.parametrize("n", [1, 2])
def test_grad_through_rounds_matches_central_differences(x64, n):
    """Heterogeneous ranks 1/2/4: client weights, server lr, per-slot pad mix and slot weights."""
    rf, state, rounds, base, val = _setup(aggregator=ag.mixed_padding())
    f, theta = _objective(rf, state, rounds, base, val, n=n)
    grad = _check_fd(f, theta)
    # every hyperparameter moves the loss (slot 0 is owned by every client, so g_0 matters too)
    assert all(np.abs(np.asarray(v)).max() > 1e-6 for v in jax.tree.leaves(grad))


def test_two_round_grad_with_adam_and_remat_equals_without(x64):
    rf, state, rounds, base, val = _setup(aggregator=ag.mixed_padding(),
                                          optimizer=optax.adam(0.05, eps_root=1e-12))
    f, theta = _objective(rf, state, rounds, base, val, n=2)
    f_remat, _ = _objective(rf, state, rounds, base, val, n=2, remat=True)
    g = _check_fd(f, theta, rtol=1e-4)
    g_remat = jax.grad(f_remat)(theta)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-13)


def test_grad_through_a_frozen_slot_method(x64):
    """HAFL freeze: clients train only their top components (update mask < forward mask) and
    aggregation sees only those; two rounds, mixed padding on the frozen-slot masks."""
    rf, state, rounds, base, val = _setup("hafl", aggregator=ag.mixed_padding(), options={"mode": "freeze"})
    spec = rounds[0].specs
    frozen = sum(float(np.sum(np.asarray(spec.masks[k]) - np.asarray(spec.update_masks[k]))) for k in spec.masks)
    assert frozen > 0, "the plan must freeze some slots for this test to mean anything"
    f, theta = _objective(rf, state, rounds, base, val, n=2)
    _check_fd(f, theta)


def test_grad_through_ffa_rounds_with_its_own_aggregator(x64):
    """FFA-LoRA (A frozen, B averaged) with its own aggregator: client weights and server lr."""
    rf, state, rounds, base, val = _setup("ffa")
    f, theta = _objective(rf, state, rounds, base, val, n=2, with_pad=False)
    _check_fd(f, theta)


def test_neutral_hyper_changes_nothing_and_never_recompiles():
    rf, state, rounds, base, _ = _setup(aggregator=ag.mixed_padding(), dtype=jnp.float32)
    inp = rounds[0]
    plain, _ = rf(state, inp.batches, inp.specs, inp.key, base)
    neutral, _ = rf(state, inp.batches, inp.specs, inp.key, base,
                    ServerHyper(server_lr=jnp.float32(1.0), aggregation=ag.PaddingHyper(pad_mix=jnp.float32(1.0))))
    traces = rf.trace_count()
    other, _ = rf(state, inp.batches, inp.specs, inp.key, base,
                  ServerHyper(server_lr=jnp.float32(0.5), aggregation=ag.PaddingHyper(pad_mix=jnp.float32(0.3))))
    assert rf.trace_count() == traces            # new values, same program
    for x, y in zip(jax.tree.leaves(plain.lora), jax.tree.leaves(neutral.lora), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert ar.leaves_differ(plain.lora, other.lora)


def test_server_lr_interpolates_between_old_and_aggregate():
    rf, state, rounds, base, _ = _setup(dtype=jnp.float32)
    inp = rounds[0]
    full, _ = rf(state, inp.batches, inp.specs, inp.key, base)
    half, _ = rf(state, inp.batches, inp.specs, inp.key, base, ServerHyper(server_lr=jnp.float32(0.5)))
    for k in state.lora:
        np.testing.assert_allclose(half.lora[k].a, 0.5 * (state.lora[k].a + full.lora[k].a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(half.head["w"], 0.5 * (state.head["w"] + full.head["w"]), rtol=1e-5, atol=1e-6)


def test_hyper_the_round_would_ignore_is_refused():
    rf, state, rounds, base, _ = _setup(dtype=jnp.float32)       # fedit does not read hyper
    inp = rounds[0]
    with pytest.raises(ValueError, match="does not read server hyperparameters"):
        rf(state, inp.batches, inp.specs, inp.key, base, ServerHyper(aggregation=ag.PaddingHyper(pad_mix=0.5)))
    with pytest.raises(ValueError, match="scalar"):
        rf(state, inp.batches, inp.specs, inp.key, base, ServerHyper(server_lr=jnp.ones(2)))
    with pytest.raises(TypeError, match="ServerHyper"):
        rf(state, inp.batches, inp.specs, inp.key, base, {"server_lr": 0.5})
    donating = make_round(tiny.TASK, ag.fedit(), optimizer=optax.sgd(0.1), donate=True)
    with pytest.raises(ValueError, match="donate=False"):
        run_rounds(donating, state, rounds, base)
    with pytest.raises(ValueError, match="empty"):
        run_rounds(rf, state, [], base)
    with pytest.raises(ValueError, match=r"\[K\]"):
        with_client_weights(inp.specs, jnp.ones((2, 3)))
