"""One conformance battery over every registered aggregator configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aggregation._agg_cases import (
    CONFIG_IDS,
    CONFIGS,
    SCALE,
    assert_trees_close,
    build,
    make_case,
    params_marking_variants_slow,
)

from fedlora_jax import aggregation as ag
from fedlora_jax import lora
from fedlora_jax.lora import LoraFactors

ALL = pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
# vmap over rounds compiles a batched program per config: variants run under -m slow
PRIMARY_ONLY = pytest.mark.parametrize("cfg", params_marking_variants_slow())


def _case(cfg, **kw):
    return make_case(with_e=cfg[3], **kw)


def _run(agg, glob, clients, w, masks, extras, state=None):
    state = agg.init(glob) if state is None else state
    return agg.aggregate(glob, clients, w, masks, state, extras=extras)


def test_every_registered_name_is_covered():
    assert {c[1] for c in CONFIGS} == set(ag.AGGREGATORS)


@ALL
def test_contract_fields(cfg):
    agg = build(cfg)
    assert isinstance(agg, ag.Aggregator)
    assert agg.name == cfg[1]
    for parts in (agg.uplink_parts, agg.downlink_parts):
        assert parts and set(parts) <= set(ag.PART_TOKENS)


@ALL
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes_kept(cfg, dtype):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg, dtype=dtype)
    new, state = _run(agg, glob, clients, w, masks, extras)
    for k, g in glob.items():
        for part in ("a", "b", "e"):
            x, y = getattr(g, part), getattr(new[k], part)
            if x is None:
                assert y is None
                continue
            assert y.shape == x.shape and y.dtype == x.dtype, (k, part)
            assert np.all(np.isfinite(np.asarray(y, np.float32)))
    if hasattr(state, "base_delta"):
        for k, g in glob.items():
            assert state.base_delta[k].shape == g.a.shape[:-1] + g.b.shape[-1:]
            assert state.base_delta[k].dtype == jnp.float32


@ALL
@pytest.mark.parametrize("nan", [False, True])
def test_masked_client_slots_never_leak(cfg, nan):
    agg = build(cfg)
    clean = _run(agg, *_case(cfg))
    dirty = _run(agg, *_case(cfg, garbage=1e3, nan=nan))
    assert_trees_close(dirty, clean, atol=1e-6, rtol=1e-6)


@ALL
def test_permuting_clients_changes_nothing(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    perm = np.array([2, 0, 3, 1])
    take = lambda t: jax.tree.map(lambda x: x[perm], t)
    ref = _run(agg, glob, clients, w, masks, extras)
    got = _run(agg, glob, take(clients), w[perm], take(masks), take(extras))
    assert_trees_close(got, ref, atol=2e-5, rtol=2e-5)


@ALL
def test_zero_weight_client_changes_nothing(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    g2, c2, _, m2, x2 = _case(cfg, seed=5, ranks=(4, 1, 3, 2))
    # a dropped client: every entry non-finite (active slots included), weight 0
    c2, x2 = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), (c2, x2))
    cat = lambda t, u: jax.tree.map(lambda x, y: jnp.concatenate([x, y[:1]]), t, u)
    w_ext = jnp.concatenate([w, jnp.zeros((1,), w.dtype)])
    ref = _run(agg, glob, clients, w, masks, extras)
    got = _run(agg, glob, cat(clients, c2), w_ext, cat(masks, m2), cat(extras, x2))
    assert_trees_close(got, ref, atol=2e-5, rtol=2e-5)


@ALL
def test_all_zero_weights_keep_previous_global(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    state0 = agg.init(glob)
    new, state = agg.aggregate(glob, clients, jnp.zeros_like(w), masks, state0, extras=extras)
    assert_trees_close(new, glob, atol=0, rtol=0)
    assert_trees_close(state, state0, atol=0, rtol=0)


@ALL
def test_scaling_weights_changes_nothing(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    assert_trees_close(_run(agg, glob, clients, 7.0 * w, masks, extras),
                       _run(agg, glob, clients, w, masks, extras), atol=2e-5, rtol=2e-5)


def _effective_delta(cfg, agg, new, state, state0, mask_one, client_one):
    """What the client's model looks like after the round: distributed adapter + base fold."""
    kw = {"client_lora": client_one} if cfg[1] == "fedsa_lora" else {}
    start = agg.distribute(new, mask_one, state, **kw)
    out = {}
    for k, f in start.items():
        d = lora.delta(f, mask_one[k], scale=SCALE)
        if hasattr(state, "base_delta"):
            d = d + state.base_delta[k] - state0.base_delta[k]
        out[k] = d
    return out


@ALL
def test_identical_clients_give_back_that_client(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg, ranks=(3, 3, 3, 3), identical=True)
    if cfg[1] == "ffa_lora":  # a is frozen and shared: clients hold the global a
        clients = {k: LoraFactors(jnp.broadcast_to(glob[k].a, f.a.shape), f.b, f.e) for k, f in clients.items()}
        clients = lora.apply_masks(clients, masks)
    state0 = agg.init(glob)
    new, state = agg.aggregate(glob, clients, w, masks, state0, extras=extras)
    one = lambda t: jax.tree.map(lambda x: x[0], t)
    got = _effective_delta(cfg, agg, new, state, state0, one(masks), one(clients))
    want = {k: lora.delta(f, one(masks)[k], scale=SCALE) for k, f in one(clients).items()}
    assert_trees_close(got, want, atol=2e-5, rtol=2e-5)


@ALL
def test_jit_equals_eager(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    state = agg.init(glob)
    eager = agg.aggregate(glob, clients, w, masks, state, extras=extras)
    jitted = jax.jit(lambda *a: agg.aggregate(*a, extras=extras))(glob, clients, w, masks, state)
    assert_trees_close(jitted, eager, atol=2e-5, rtol=2e-5)


@PRIMARY_ONLY
def test_vmap_over_rounds(cfg):
    agg = build(cfg)
    cases = [_case(cfg, seed=s) for s in (1, 2)]
    states = [agg.init(c[0]) for c in cases]
    loop = [agg.aggregate(*c[:4], s, extras=c[4]) for c, s in zip(cases, states, strict=True)]
    stack = lambda xs: jax.tree.map(lambda *v: jnp.stack(v), *xs)
    args = stack([c[:4] + (s, c[4]) for c, s in zip(cases, states, strict=True)])
    got = jax.vmap(lambda g, c, w, m, s, x: agg.aggregate(g, c, w, m, s, extras=x))(*args)
    assert_trees_close(got, stack(loop), atol=2e-5, rtol=2e-5)


@ALL
def test_distribute_is_vmappable_and_masks_exact(cfg):
    agg = build(cfg)
    glob, clients, w, masks, extras = _case(cfg)
    new, state = _run(agg, glob, clients, w, masks, extras)
    if cfg[1] == "fedsa_lora":
        out = jax.vmap(lambda m, c: agg.distribute(new, m, state, client_lora=c))(masks, clients)
    else:
        out = jax.vmap(lambda m: agg.distribute(new, m, state))(masks)
    for k, f in out.items():
        m = np.asarray(masks[k])
        assert f.a.shape == clients[k].a.shape and f.a.dtype == glob[k].a.dtype
        np.testing.assert_array_equal(np.asarray(f.a)[np.broadcast_to(m[..., None, :] == 0, f.a.shape)], 0)
        np.testing.assert_array_equal(np.asarray(f.b)[np.broadcast_to(m[..., :, None] == 0, f.b.shape)], 0)
        one = jax.tree.map(lambda x: x[1], masks)
        single = agg.distribute(new, one, state, **({"client_lora": jax.tree.map(lambda x: x[1], clients)}
                                                   if cfg[1] == "fedsa_lora" else {}))
        assert_trees_close(jax.tree.map(lambda x: x[1], out[k]), single[k], atol=0, rtol=0)
