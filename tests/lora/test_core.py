import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import lora
from fedlora_jax.lora import LoraFactors

SHAPES = {"layer.0.query": (16, 12), "layer.0.value": (16, 20), "layer.1.query": (16, 12)}


def _rand_tree(key, r_max=4, dtype=jnp.float32):
    tree = lora.init(key, SHAPES, r_max, std=0.3, dtype=dtype)
    k2 = jax.random.fold_in(key, 7)
    return {n: LoraFactors(f.a, (0.3 * jax.random.normal(jax.random.fold_in(k2, i), f.b.shape)).astype(dtype))
            for i, (n, f) in enumerate(sorted(tree.items()))}


def test_init_shapes_and_b_zero():
    tree = lora.init(jax.random.key(0), SHAPES, 8)
    for name, (n, m) in SHAPES.items():
        assert tree[name].a.shape == (n, 8) and tree[name].b.shape == (8, m)
        assert not np.any(np.asarray(tree[name].b))
        assert np.any(np.asarray(tree[name].a))
        assert tree[name].e is None


def test_init_svd_form_starts_at_zero_delta():
    tree = lora.init(jax.random.key(0), SHAPES, 6, scheme="svd_form")
    for f in tree.values():
        assert f.e.shape == (6,)
        np.testing.assert_array_equal(np.asarray(lora.delta(f, scale=1.0)), 0.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_init_rejects_bad_r_max(bad):
    with pytest.raises(ValueError, match="r_max"):
        lora.init(jax.random.key(0), SHAPES, bad)


def test_init_rejects_unknown_scheme_and_empty():
    with pytest.raises(ValueError, match="scheme"):
        lora.init(jax.random.key(0), SHAPES, 4, scheme="nope")
    with pytest.raises(ValueError, match="empty"):
        lora.init(jax.random.key(0), {}, 4)


def test_rank_mask_prefix_and_errors():
    np.testing.assert_array_equal(np.asarray(lora.rank_mask(3, 5)), [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="rank"):
        lora.rank_mask(6, 5)
    with pytest.raises(ValueError, match="rank"):
        lora.rank_mask(-1, 5)
    with pytest.raises(ValueError, match="unknown modules"):
        lora.rank_masks({"nope": 2}, SHAPES, 4)


def test_apply_matches_numpy_reference():
    key = jax.random.key(1)
    tree = _rand_tree(key)
    f = tree["layer.0.value"]
    x = jax.random.normal(key, (3, 5, 16))
    w = jax.random.normal(jax.random.fold_in(key, 1), (16, 20))
    bias = jnp.arange(20.0)
    mask = lora.rank_mask(3, 4)
    y = lora.apply(x, w, f, mask, scale=0.5, bias=bias)
    xa, wa, a, b, m = (np.asarray(v, np.float64) for v in (x, w, f.a, f.b, mask))
    ref = xa @ wa + np.asarray(bias) + 0.5 * ((xa @ a) * m) @ b
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_zero_b_is_identity():
    tree = lora.init(jax.random.key(0), SHAPES, 4)
    x = jax.random.normal(jax.random.key(2), (7, 16))
    w = jax.random.normal(jax.random.key(3), (16, 12))
    np.testing.assert_array_equal(np.asarray(lora.apply(x, w, tree["layer.0.query"], scale=2.0)),
                                  np.asarray(x @ w))


def test_masked_ranks_contribute_nothing():
    tree = _rand_tree(jax.random.key(4))
    f = tree["layer.0.query"]
    mask = lora.rank_mask(2, 4)
    garbage = LoraFactors(f.a.at[:, 2:].set(99.0), f.b.at[2:, :].set(-7.0))
    x = jax.random.normal(jax.random.key(5), (4, 16))
    w = jnp.zeros((16, 12))
    np.testing.assert_array_equal(np.asarray(lora.apply(x, w, f, mask, scale=1.0)),
                                  np.asarray(lora.apply(x, w, garbage, mask, scale=1.0)))
    zero_mask = jnp.zeros(4)
    np.testing.assert_array_equal(np.asarray(lora.apply(x, w, garbage, zero_mask, scale=1.0)), 0.0)


def test_svd_form_gain_and_mask():
    f = _rand_tree(jax.random.key(6))["layer.0.query"]
    e = jnp.array([1.0, -2.0, 0.5, 3.0])
    fe = LoraFactors(f.a, f.b, e)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    ref = np.asarray(f.a) @ np.diag(np.asarray(e * mask)) @ np.asarray(f.b)
    np.testing.assert_allclose(np.asarray(lora.delta(fe, mask, scale=1.0)), ref, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip_and_equivalence():
    f = _rand_tree(jax.random.key(7))["layer.0.value"]
    w = jax.random.normal(jax.random.key(8), (16, 20))
    mask = lora.rank_mask(3, 4)
    merged = lora.merge(w, f, mask, scale=0.25)
    x = jax.random.normal(jax.random.key(9), (6, 16))
    np.testing.assert_allclose(np.asarray(x @ merged), np.asarray(lora.apply(x, w, f, mask, scale=0.25)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.unmerge(merged, f, mask, scale=0.25)), np.asarray(w),
                               rtol=1e-6, atol=1e-6)


def test_apply_stacked_equals_loop():
    key = jax.random.key(10)
    c, r = 5, 4
    a = jax.random.normal(key, (c, 16, r))
    b = jax.random.normal(jax.random.fold_in(key, 1), (c, r, 12))
    masks = jnp.stack([lora.rank_mask(k % (r + 1), r) for k in range(c)])
    x = jax.random.normal(jax.random.fold_in(key, 2), (c, 3, 16))
    w = jax.random.normal(jax.random.fold_in(key, 3), (16, 12))
    y = lora.apply_stacked(x, w, LoraFactors(a, b), masks, scale=0.5)
    for k in range(c):
        yk = lora.apply(x[k], w, LoraFactors(a[k], b[k]), masks[k], scale=0.5)
        np.testing.assert_allclose(np.asarray(y[k]), np.asarray(yk), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved(dtype):
    tree = _rand_tree(jax.random.key(11), dtype=dtype)
    f = tree["layer.0.query"]
    w = jnp.ones((16, 12), dtype)
    x = jnp.ones((2, 16), dtype)
    assert lora.apply(x, w, f, scale=1.0).dtype == dtype
    assert lora.merge(w, f, scale=1.0).dtype == dtype
    assert lora.delta(f, scale=1.0).dtype == jnp.float32
    masked = lora.apply_masks(tree, lora.rank_masks(2, SHAPES, 4))
    assert masked["layer.0.query"].a.dtype == dtype


def test_apply_masks_zeroes_slots():
    tree = _rand_tree(jax.random.key(12))
    masked = lora.apply_masks(tree, lora.rank_masks(1, SHAPES, 4))
    for f in masked.values():
        assert not np.any(np.asarray(f.a[:, 1:])) and not np.any(np.asarray(f.b[1:, :]))
        assert np.all(np.asarray(f.a[:, 0]) != 0)


def test_counts_match_hand_count():
    tree = lora.init(jax.random.key(0), SHAPES, 8)
    masks = lora.rank_masks({"layer.0.query": 3, "layer.0.value": 0, "layer.1.query": 8}, SHAPES, 8)
    # 3*(16+12) + 0 + 8*(16+12)
    assert int(lora.count_params(tree, masks)) == 3 * 28 + 8 * 28
    assert int(lora.count_params(tree, masks, parts=("b",))) == 3 * 12 + 8 * 12
    assert int(lora.count_bytes(tree, masks)) == 4 * (3 * 28 + 8 * 28)
    assert int(lora.count_bytes(tree, masks, bytes_per_param=2)) == 2 * (3 * 28 + 8 * 28)
    assert int(lora.count_params(tree)) == 8 * (28 + 36 + 28)
    svd = lora.init(jax.random.key(0), SHAPES, 8, scheme="svd_form")
    assert int(lora.count_params(svd, masks)) == 3 * 29 + 8 * 29
    stacked_masks = {k: jnp.stack([v, v * 0]) for k, v in masks.items()}
    np.testing.assert_array_equal(np.asarray(lora.count_params(tree, stacked_masks)), [11 * 28, 0])
    with pytest.raises(ValueError, match="parts"):
        lora.count_params(tree, masks, parts=("z",))


def test_validate_errors():
    tree = lora.init(jax.random.key(0), SHAPES, 4)
    lora.validate(tree, lora.rank_masks(2, SHAPES, 4), r_max=4)
    bad = dict(tree)
    bad["layer.0.query"] = LoraFactors(tree["layer.0.query"].a, jnp.zeros((3, 12)))
    with pytest.raises(ValueError, match="layer.0.query"):
        lora.validate(bad)
    with pytest.raises(ValueError, match="r_max"):
        lora.validate(tree, r_max=5)
    with pytest.raises(TypeError, match="floating"):
        lora.validate({"m": LoraFactors(jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)))})
    with pytest.raises(ValueError, match="no mask"):
        lora.validate(tree, {})


def test_jit_and_grad_through_apply():
    f = _rand_tree(jax.random.key(13))["layer.0.query"]
    x = jax.random.normal(jax.random.key(14), (4, 16))
    w = jax.random.normal(jax.random.key(15), (16, 12))
    mask = lora.rank_mask(2, 4)
    loss = lambda fac: jnp.sum(lora.apply(x, w, fac, mask, scale=1.0) ** 2)
    g = jax.jit(jax.grad(loss))(f)
    # Gradients of masked slots are exactly zero.
    assert not np.any(np.asarray(g.a[:, 2:])) and not np.any(np.asarray(g.b[2:, :]))
    assert np.any(np.asarray(g.a[:, :2]))


def _merged_inputs(key, with_e):
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (3, 5, 16))
    w = jax.random.normal(ks[1], (16, 12))
    bias = jax.random.normal(ks[2], (12,))
    e = jax.random.normal(ks[5], (4,)) if with_e else None
    f = LoraFactors(jax.random.normal(ks[3], (16, 4)), jax.random.normal(ks[4], (4, 12)), e)
    ct = jax.random.normal(ks[6], (3, 5, 12))
    return x, w, bias, f, ct


@pytest.mark.parametrize("with_e", [False, True])
@pytest.mark.parametrize("mask", [None, (1.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_apply_merged_values_and_all_gradients_match_apply(with_e, mask, with_bias):
    x, w, bias, f, ct = _merged_inputs(jax.random.key(3), with_e)
    bias = bias if with_bias else None
    m = None if mask is None else jnp.asarray(mask)

    def loss(fn, x, w, bias, f, m, scale):
        return jnp.sum(fn(x, w, f, m, scale=scale, bias=bias) * ct)

    args = (x, w, bias, f, m, jnp.float32(0.7))
    argnums = tuple(i for i, v in enumerate(args) if v is not None)
    np.testing.assert_allclose(np.asarray(lora.apply_merged(x, w, f, m, scale=0.7, bias=bias)),
                               np.asarray(lora.apply(x, w, f, m, scale=0.7, bias=bias)), rtol=1e-5, atol=1e-5)
    ref = jax.grad(lambda *a: loss(lora.apply, *a), argnums=argnums)(*args)
    got = jax.jit(jax.grad(lambda *a: loss(lora.apply_merged, *a), argnums=argnums))(*args)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_apply_merged_vmapped_over_clients_equals_loop():
    x, w, bias, f, ct = _merged_inputs(jax.random.key(4), True)
    xs = jnp.stack([x, 2 * x])
    fs = jax.tree.map(lambda t: jnp.stack([t, -0.5 * t]), f)
    ms = jnp.array([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])

    def loss(x, fc, m):
        return jnp.sum(lora.apply_merged(x, w, fc, m, scale=0.5, bias=bias) * ct)

    got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(xs, fs, ms)
    for c in range(2):
        ref = jax.grad(loss, argnums=(0, 1))(xs[c], jax.tree.map(lambda t, c=c: t[c], fs), ms[c])
        for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(jax.tree.map(lambda t, c=c: t[c], got)), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_apply_merged_refuses_half_precision():
    x, w, bias, f, _ = _merged_inputs(jax.random.key(5), False)
    with pytest.raises(TypeError, match="float32"):
        lora.apply_merged(x.astype(jnp.bfloat16), w, f, None, scale=1.0)
