"""FedARA / HAFL / prefix rank rules vs NumPy and Python-loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.algorithms import rank_rules as rr
from fedlora_jax.importance import BudgetSchedule
from fedlora_jax.lora import LoraFactors

R = 6
SHAPES = {"layer.0.query": (5, 7), "layer.0.value": (5, 7), "layer.1.query": (5, 7),
          "layer.2.output": (9, 5)}


def _np_orth(tree, masks, count="active"):
    tot, n = 0.0, 0
    for k, f in tree.items():
        a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
        z = np.ones(R) if masks is None else np.asarray(masks[k], np.float64)
        zz = np.outer(z, z)
        Q, P = a.T, b.T
        tot += np.linalg.norm((Q @ Q.T - np.eye(R)) * zz, "fro")
        tot += np.linalg.norm((P.T @ P - np.eye(R)) * zz, "fro")
        n += 2 if (count == "all" or z.any()) else 0
    return tot / max(n, 1)


def test_svd_init():
    t = rr.svd_adapter_init(jax.random.key(0), SHAPES, R)
    for k, (n, m) in SHAPES.items():
        assert t[k].a.shape == (n, R) and t[k].b.shape == (R, m)
        np.testing.assert_array_equal(t[k].e, 0.0)
    allv = np.concatenate([np.ravel(t[k].a) for k in t])
    assert 0.012 < allv.std() < 0.028


def test_orth_regularizer_formula():
    rng = np.random.default_rng(0)
    tree = {k: LoraFactors(jnp.asarray(rng.normal(size=(n, R)) * 0.3, jnp.float32),
                           jnp.asarray(rng.normal(size=(R, m)) * 0.3, jnp.float32),
                           jnp.zeros(R)) for k, (n, m) in SHAPES.items()}
    masks = {k: jnp.asarray(rng.integers(0, 2, size=R), jnp.float32) for k in SHAPES}
    masks["layer.1.query"] = jnp.zeros(R)  # a pruned module
    np.testing.assert_allclose(rr.orth_regularizer(tree), _np_orth(tree, None), rtol=1e-5)
    np.testing.assert_allclose(rr.orth_regularizer(tree, masks), _np_orth(tree, masks), rtol=1e-5)
    np.testing.assert_allclose(rr.orth_regularizer(tree, masks, count="all"),
                               _np_orth(tree, masks, "all"), rtol=1e-5)
    # Finite gradient, and zero gradient into a fully pruned module.
    g = jax.grad(lambda t: rr.orth_regularizer(t, masks))(tree)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    np.testing.assert_array_equal(g["layer.1.query"].a, 0.0)
    # Orthonormal columns give zero penalty.
    q, _ = np.linalg.qr(rng.normal(size=(8, R)))
    ortho = {"m": LoraFactors(jnp.asarray(q, jnp.float32), jnp.asarray(q.T, jnp.float32), None)}
    assert float(rr.orth_regularizer(ortho)) < 1e-5
    # Stacked clients.
    st = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)
    got = rr.orth_regularizer(st)
    assert got.shape == (2,)
    np.testing.assert_allclose(got[1], rr.orth_regularizer(jax.tree.map(lambda x: 2 * x, tree)), rtol=1e-5)


def test_active_and_lowest_layer():
    masks = {"layer.0.query": jnp.array([[0, 0, 0.0], [1, 0, 0]]),
             "layer.1.query": jnp.array([[0, 1, 1.0], [1, 1, 0]]),
             "layer.2.output": jnp.array([[1, 0, 0.0], [0, 0, 0]])}
    act = rr.active_modules(masks)
    np.testing.assert_array_equal(act["layer.0.query"], [False, True])
    np.testing.assert_array_equal(rr.lowest_active_layer(masks), [1, 0])
    np.testing.assert_array_equal(rr.lowest_active_layer(masks, r_min=2), [1, 1])
    none = {k: jnp.zeros((2, 3)) for k in masks}
    np.testing.assert_array_equal(rr.lowest_active_layer(none, num_layers=4), [4, 4])
    custom = rr.lowest_active_layer({"q": jnp.ones(2), "v": jnp.ones(2)}, {"q": 5, "v": 3})
    assert int(custom) == 3
    with pytest.raises(ValueError, match="layer"):
        rr.lowest_active_layer({"query": jnp.ones(2)})
    np.testing.assert_array_equal(rr.prune_modules(masks, 2)["layer.2.output"], 0.0)


def test_fedara_allocate_nested_across_rounds():
    rng = np.random.default_rng(1)
    sched = BudgetSchedule(b0=4 * R, b_final=5, t_init=2, t_final=2, total=12)
    masks = {k: jnp.ones(R) for k in SHAPES}
    alloc = jax.jit(lambda m, s, t: rr.fedara_allocate(m, s, t, sched))
    for t in range(14):
        scores = {k: jnp.asarray(rng.random(R), jnp.float32) for k in SHAPES}
        new = alloc(masks, scores, jnp.int32(t))
        assert all(np.all(np.asarray(new[k]) <= np.asarray(masks[k])) for k in SHAPES)
        b, now = sched(t)
        total = sum(float(new[k].sum()) for k in SHAPES)
        prev_total = sum(float(masks[k].sum()) for k in SHAPES)
        assert total == (min(b, prev_total) if now else prev_total)
        masks = new
    assert sum(float(masks[k].sum()) for k in SHAPES) == 5
    assert alloc._cache_size() == 1


def test_hafl_truncation_keeps_exactly_top():
    s = {"m": jnp.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.0])}
    got = rr.hafl_truncation_masks(s, jnp.array([0, 1, 2, 3]))["m"]
    np.testing.assert_array_equal(got, [[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0],
                                        [0, 1, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="r_max"):
        rr.hafl_truncation_masks(s, jnp.array([7]))


def test_hafl_update_masks():
    rng = np.random.default_rng(2)
    scores = {"m": jnp.asarray(rng.random((3, R)), jnp.float32),
              "n": jnp.asarray(rng.random((3, R)), jnp.float32)}
    ranks = jnp.array([1, 3, 6])
    hm = rr.hafl_update_masks(scores, ranks)
    for k in scores:
        np.testing.assert_array_equal(hm.forward[k], 1.0)
        for c in range(3):
            want = np.zeros(R)
            want[np.argsort(-np.asarray(scores[k][c]), kind="stable")[: int(ranks[c])]] = 1
            np.testing.assert_array_equal(hm.update[k][c], want)
    first = rr.hafl_update_masks(scores, ranks, first_round=jnp.bool_(True))
    np.testing.assert_array_equal(first.update["m"], rr.prefix_masks(ranks, R))
    rnd = rr.hafl_update_masks(scores, ranks, first_round=True, init="random", key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(rnd.update["m"]).sum(-1), ranks)
    with pytest.raises(ValueError, match="key"):
        rr.hafl_update_masks(scores, ranks, init="random")


def test_prefix_masks():
    m = rr.prefix_masks(jnp.array([0, 2, 6]), R)
    want = np.array([[i < r for i in range(R)] for r in (0, 2, 6)], np.float32)
    np.testing.assert_array_equal(m, want)
    d = rr.prefix_masks(jnp.array([1, 2]), R, keys=["a", "b"])
    assert set(d) == {"a", "b"} and d["a"].shape == (2, R)
    per_layer = rr.prefix_masks({"a": jnp.array([[1, 2], [3, 4]])}, R)
    assert per_layer["a"].shape == (2, 2, R)
    with pytest.raises(TypeError):
        rr.prefix_masks(jnp.array([1.5]), R)


def test_hafl_jit_traced_ranks():
    s = {"m": jnp.arange(12.0).reshape(3, 4)}
    f = jax.jit(lambda s, r, first: rr.hafl_update_masks(s, r, first_round=first).update)
    got = f(s, jnp.array([1, 2, 3]), jnp.bool_(False))["m"]
    np.testing.assert_array_equal(got, [[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    got = f(s, jnp.array([1, 2, 3]), jnp.bool_(True))["m"]
    np.testing.assert_array_equal(got, rr.prefix_masks(jnp.array([1, 2, 3]), 4))
    assert f._cache_size() == 1
