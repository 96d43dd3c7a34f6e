"""fedlora_jax.linalg: QR-core SVD of low-rank products against NumPy's dense SVD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import linalg
from fedlora_jax.linalg import (
    SVDResult,
    dense_svd,
    lowrank_svd,
    randomized_svd,
    stacked_lowrank_svd,
    truncate_to_factors,
)

# (batch, M, K, N): M != N, M < K, K > min(M, N), square, several batch dims.
SHAPES = [((), 20, 4, 15), ((3,), 15, 4, 24), ((2,), 3, 6, 10), ((2, 3), 12, 5, 12),
          ((), 8, 8, 8), ((4,), 9, 12, 7)]
ATOL, RTOL = 2e-5, 2e-5


def _factors(seed, batch, m, k, n, dtype=np.float32):
    rng = np.random.default_rng(seed)
    left = rng.standard_normal(batch + (m, k)).astype(dtype)
    right = rng.standard_normal(batch + (k, n)).astype(dtype)
    return left, right


def _np_svd(p, rank):
    """NumPy reference with the library's sign convention (largest-|.| vt entry positive)."""
    u, s, vt = np.linalg.svd(p.astype(np.float64), full_matrices=False)
    u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    idx = np.argmax(np.abs(vt), axis=-1)
    sign = np.where(np.take_along_axis(vt, idx[..., None], axis=-1)[..., 0] < 0, -1.0, 1.0)
    return u * sign[..., None, :], s, vt * sign[..., :, None]


def _product(res):
    return np.asarray(res.u) @ (np.asarray(res.s)[..., None] * np.asarray(res.vt))


@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_matches_numpy(shape):
    batch, m, k, n = shape
    left, right = _factors(0, batch, m, k, n)
    p = min(m, n, k)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))
    assert isinstance(res, SVDResult)
    assert res.u.shape == batch + (m, p) and res.s.shape == batch + (p,)
    assert res.vt.shape == batch + (p, n)
    u, s, vt = _np_svd(left @ right, p)
    scale = s[..., :1]
    np.testing.assert_allclose(np.asarray(res.s) / scale, s / scale, atol=ATOL)
    # Random Gaussian factors have a clear gap: vectors agree after the sign convention.
    np.testing.assert_allclose(np.asarray(res.u), u, atol=2e-4)
    np.testing.assert_allclose(np.asarray(res.vt), vt, atol=2e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthonormal_and_reconstruction(shape):
    batch, m, k, n = shape
    left, right = _factors(1, batch, m, k, n)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))
    p = res.s.shape[-1]
    u, vt = np.asarray(res.u), np.asarray(res.vt)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, np.broadcast_to(np.eye(p), batch + (p, p)),
                               atol=1e-5)
    np.testing.assert_allclose(vt @ np.swapaxes(vt, -1, -2), np.broadcast_to(np.eye(p), batch + (p, p)),
                               atol=1e-5)
    assert np.all(np.diff(np.asarray(res.s), axis=-1) <= 0)
    dense = left @ right
    np.testing.assert_allclose(_product(res), dense, atol=1e-4 * np.abs(dense).max())


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_eckart_young_truncation_error(rank):
    left, right = _factors(2, (2,), 30, 5, 22)
    dense = (left @ right).astype(np.float64)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right), rank=rank)
    s_all = np.linalg.svd(dense, compute_uv=False)
    err2 = np.sum((dense - _product(res)) ** 2, axis=(-2, -1))
    tail2 = np.sum(s_all[..., rank:] ** 2, axis=-1)
    np.testing.assert_allclose(err2, tail2, rtol=1e-4)


def test_dense_svd_matches_lowrank_and_numpy():
    left, right = _factors(3, (3,), 16, 4, 11)
    low = lowrank_svd(jnp.asarray(left), jnp.asarray(right), rank=3)
    den = dense_svd(jnp.asarray(left), jnp.asarray(right), rank=3)
    u, s, vt = _np_svd(left @ right, 3)
    for res in (low, den):
        np.testing.assert_allclose(np.asarray(res.s), s, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(res.u), u, atol=1e-4)
        np.testing.assert_allclose(np.asarray(res.vt), vt, atol=1e-4)


def test_sign_convention_deterministic():
    left, right = _factors(4, (5,), 13, 4, 9)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))
    vt = np.asarray(res.vt)
    pivot = np.take_along_axis(vt, np.argmax(np.abs(vt), axis=-1)[..., None], axis=-1)
    assert np.all(pivot > 0)
    # Same product from different factors (-L, -R; L Q, Q^T R) gives bit-comparable vectors.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    for l2, r2 in ((-left, -right), (left @ q, q.T @ right)):
        res2 = lowrank_svd(jnp.asarray(l2.astype(np.float32)), jnp.asarray(r2.astype(np.float32)))
        np.testing.assert_allclose(np.asarray(res2.u), np.asarray(res.u), atol=1e-4)
        np.testing.assert_allclose(np.asarray(res2.vt), vt, atol=1e-4)


def test_stacked_equals_dense_sum_both_paths():
    rng = np.random.default_rng(5)
    c, m, k, n = 3, 40, 4, 30
    left = rng.standard_normal((c, 2, m, k)).astype(np.float32)
    right = rng.standard_normal((c, 2, k, n)).astype(np.float32)
    w = np.array([0.5, 0.2, 0.3], np.float32)
    dense = sum(w[i] * left[i].astype(np.float64) @ right[i] for i in range(c))
    s_ref = np.linalg.svd(dense, compute_uv=False)
    full = c * k
    for method in ("auto", "lowrank", "dense"):
        res = stacked_lowrank_svd(jnp.asarray(left), jnp.asarray(right), jnp.asarray(w),
                                  rank=full, method=method)
        np.testing.assert_allclose(_product(res), dense, atol=1e-4)
        np.testing.assert_allclose(np.asarray(res.s), s_ref[..., :full], rtol=1e-4, atol=1e-5)
    # Truncated products agree between paths (clear gap for Gaussian data).
    r5 = [_product(stacked_lowrank_svd(jnp.asarray(left), jnp.asarray(right), jnp.asarray(w),
                                       rank=5, method=mth)) for mth in ("lowrank", "dense")]
    np.testing.assert_allclose(r5[0], r5[1], atol=1e-4)


def test_stacked_default_weights_and_auto_switch():
    rng = np.random.default_rng(6)
    # C*K = 12 >= min(M, N) = 10 -> auto forms the dense sum (no QR in the program).
    left = rng.standard_normal((3, 10, 4)).astype(np.float32)
    right = rng.standard_normal((3, 4, 14)).astype(np.float32)
    dense = np.einsum("cmk,ckn->mn", left, right)
    fn = lambda a, b: stacked_lowrank_svd(a, b, rank=4)
    res = fn(jnp.asarray(left), jnp.asarray(right))
    np.testing.assert_allclose(np.asarray(res.s), np.linalg.svd(dense, compute_uv=False)[:4],
                               rtol=1e-5)
    assert "qr" not in str(jax.make_jaxpr(fn)(left, right))
    big_l = rng.standard_normal((3, 40, 4)).astype(np.float32)
    big_r = rng.standard_normal((3, 4, 50)).astype(np.float32)
    assert "qr" in str(jax.make_jaxpr(fn)(big_l, big_r))


def test_stacked_factors_layout():
    rng = np.random.default_rng(7)
    left = rng.standard_normal((2, 5, 3)).astype(np.float32)
    right = rng.standard_normal((2, 3, 4)).astype(np.float32)
    l_st, r_st = linalg.stacked_factors(jnp.asarray(left), jnp.asarray(right), jnp.array([2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(l_st), np.concatenate([2 * left[0], 3 * left[1]], axis=1),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r_st), np.concatenate([right[0], right[1]], axis=0))


def test_zero_and_rank_deficient_inputs_no_nan():
    z_l, z_r = jnp.zeros((2, 12, 4)), jnp.zeros((2, 4, 9))
    left, right = _factors(8, (2,), 12, 4, 9)
    left[..., 2:] = 0.0  # masked columns: rank 2 of 4
    masked = (jnp.asarray(left), jnp.asarray(right))
    for l, r in ((z_l, z_r), (jnp.asarray(left), z_r), masked):
        outs = [lowrank_svd(l, r), lowrank_svd(l, r, gradient_safe=True), dense_svd(l, r),
                randomized_svd(l, r, rank=3, key=jax.random.key(0)),
                stacked_lowrank_svd(l[None], r[None], rank=3)]
        for res in outs:
            assert all(np.isfinite(np.asarray(x)).all() for x in res)
    res = lowrank_svd(*masked)
    np.testing.assert_allclose(np.asarray(res.s)[..., 2:], 0.0, atol=1e-5)
    np.testing.assert_allclose(_product(res), left @ right, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(lowrank_svd(z_l, z_r).s), 0.0)


def test_bf16_computes_in_float32():
    left, right = _factors(9, (2,), 16, 4, 12)
    lb, rb = jnp.asarray(left, jnp.bfloat16), jnp.asarray(right, jnp.bfloat16)
    res = lowrank_svd(lb, rb)
    assert res.u.dtype == res.s.dtype == res.vt.dtype == jnp.float32
    ref = np.asarray(lb.astype(jnp.float32)) @ np.asarray(rb.astype(jnp.float32))
    _, s, _ = _np_svd(ref, 4)
    # The f32 result of the bf16 *values* (not a bf16 computation: that would be ~1e-2 off).
    np.testing.assert_allclose(np.asarray(res.s), s, rtol=1e-5)


def test_float64_inputs_stay_float64(x64):
    left, right = _factors(10, (2,), 14, 5, 11, dtype=np.float64)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right), rank=4)
    assert res.s.dtype == jnp.float64
    u, s, vt = _np_svd(left @ right, 4)
    np.testing.assert_allclose(np.asarray(res.s), s, rtol=1e-11)
    np.testing.assert_allclose(np.asarray(res.u), u, atol=1e-10)
    np.testing.assert_allclose(np.asarray(res.vt), vt, atol=1e-10)


def test_randomized_top_singular_values_close():
    rng = np.random.default_rng(11)
    m, k, n = 60, 30, 50
    # Decaying spectrum: left = Q diag(2^-i), right Gaussian.
    q, _ = np.linalg.qr(rng.standard_normal((m, k)))
    left = (q * 2.0 ** -np.arange(k) * 0.5 ** 0).astype(np.float32)
    right = rng.standard_normal((k, n)).astype(np.float32)
    res = randomized_svd(jnp.asarray(left), jnp.asarray(right), rank=5, key=jax.random.key(3))
    s_ref = np.linalg.svd(left.astype(np.float64) @ right, compute_uv=False)[:5]
    np.testing.assert_allclose(np.asarray(res.s), s_ref, rtol=1e-3)
    low = _product(lowrank_svd(jnp.asarray(left), jnp.asarray(right), rank=5))
    np.testing.assert_allclose(_product(res), low, atol=1e-3 * np.abs(low).max())
    # Same key -> same result; different key -> still close.
    again = randomized_svd(jnp.asarray(left), jnp.asarray(right), rank=5, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(again.s), np.asarray(res.s))


def test_jit_and_vmap():
    left, right = _factors(12, (4,), 18, 4, 13)
    l, r = jnp.asarray(left), jnp.asarray(right)
    eager = lowrank_svd(l, r, rank=3)
    jitted = jax.jit(lowrank_svd, static_argnames=("rank",))(l, r, rank=3)
    vmapped = jax.vmap(lambda a, b: lowrank_svd(a, b, rank=3))(l, r)
    loop = [lowrank_svd(l[i], r[i], rank=3) for i in range(4)]
    for res in (jitted, vmapped):
        for got, want in zip(res, eager, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for i, res in enumerate(loop):
        np.testing.assert_allclose(np.asarray(res.s), np.asarray(eager.s[i]), rtol=1e-5)
        np.testing.assert_allclose(_product(res), _product(eager)[i], atol=1e-4)
    st = jax.jit(lambda a, b, w: stacked_lowrank_svd(a, b, w, rank=3, gradient_safe=True))
    out = st(l, r, jnp.ones((4,)))
    ref = stacked_lowrank_svd(l, r, rank=3)
    np.testing.assert_allclose(np.asarray(out.s), np.asarray(ref.s), rtol=1e-5)
    # Random key under vmap over a layer axis.
    keys = jax.random.split(jax.random.key(0), 4)
    rv = jax.vmap(lambda a, b, kk: randomized_svd(a, b, rank=3, key=kk))(l, r, keys)
    np.testing.assert_allclose(np.asarray(rv.s), np.asarray(eager.s), rtol=1e-3)


def test_batch_dims_broadcast():
    left, _ = _factors(13, (3,), 10, 4, 8)
    _, right = _factors(14, (), 10, 4, 8)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))
    assert res.s.shape == (3, 4)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(res.s[i]),
                                   np.linalg.svd(left[i] @ right, compute_uv=False)[:4], rtol=1e-5)


# ------------------------------------------------------------------ truncate_to_factors


@pytest.mark.parametrize("split", ["b", "all_left", "all_right", "sqrt"])
def test_truncate_products_split_independent(split):
    left, right = _factors(15, (2,), 14, 5, 10)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))
    a, b = truncate_to_factors(res, 3, split=split)
    assert a.shape == (2, 14, 3) and b.shape == (2, 3, 10)
    u, s, vt = _np_svd(left @ right, 3)
    np.testing.assert_allclose(np.asarray(a @ b), u @ (s[..., None] * vt), atol=1e-4)
    if split in ("b", "all_left"):
        np.testing.assert_allclose(np.asarray(b), np.asarray(res.vt[..., :3, :]))
    if split == "all_right":
        np.testing.assert_allclose(np.asarray(a), np.asarray(res.u[..., :3]))


def test_truncate_mask_broadcast_pad_and_dtype():
    left, right = _factors(16, (), 12, 3, 9)
    res = lowrank_svd(jnp.asarray(left), jnp.asarray(right))  # r = 3 components
    masks = jnp.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)  # [C, R=5]
    a, b = truncate_to_factors(res, masks, split="sqrt", dtype=jnp.bfloat16)
    assert a.shape == (3, 12, 5) and b.shape == (3, 5, 9) and a.dtype == jnp.bfloat16
    m = np.asarray(masks)
    np.testing.assert_array_equal(np.asarray(a, np.float32) * (1 - m[:, None, :]), 0.0)
    np.testing.assert_array_equal(np.asarray(b, np.float32) * (1 - m[:, :, None]), 0.0)
    # Width 5 > 3 components: slots 3, 4 are zero even where the mask is 1.
    np.testing.assert_array_equal(np.asarray(a, np.float32)[2, :, 3:], 0.0)
    dense = left.astype(np.float64) @ right
    for c, t in enumerate((2, 1, 3)):
        u, s, vt = _np_svd(dense, t)
        prod = np.asarray(a[c], np.float32) @ np.asarray(b[c], np.float32)
        np.testing.assert_allclose(prod, u @ (s[:, None] * vt), atol=5e-2 * np.abs(dense).max())


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    l, r = jnp.ones((8, 4)), jnp.ones((4, 6))
    with pytest.raises(ValueError, match="rank=5"):
        lowrank_svd(l, r, rank=5)
    with pytest.raises(ValueError, match="rank=9"):
        dense_svd(jnp.ones((3, 6)), jnp.ones((6, 10)), rank=9)  # K > min(M, N) = 3
    with pytest.raises(ValueError, match="rank=4"):
        lowrank_svd(jnp.ones((3, 6)), jnp.ones((6, 10)), rank=4)
    with pytest.raises(ValueError, match="rank=0"):
        lowrank_svd(l, r, rank=0)
    with pytest.raises(ValueError, match="static Python int"):
        lowrank_svd(l, r, rank=2.0)
    with pytest.raises(ValueError, match="inner sizes"):
        lowrank_svd(l, jnp.ones((3, 6)))
    with pytest.raises(ValueError, match=r"left must have shape"):
        lowrank_svd(jnp.ones((4,)), r)
    with pytest.raises(ValueError, match="batch dims"):
        lowrank_svd(jnp.ones((2, 8, 4)), jnp.ones((3, 4, 6)))
    with pytest.raises(TypeError, match="floating"):
        lowrank_svd(jnp.ones((8, 4), jnp.int32), r)
    with pytest.raises(ValueError, match="rank=13"):
        stacked_lowrank_svd(jnp.ones((3, 8, 4)), jnp.ones((3, 4, 6)), rank=13)
    with pytest.raises(ValueError, match="weights"):
        stacked_lowrank_svd(jnp.ones((3, 8, 4)), jnp.ones((3, 4, 6)), jnp.ones((2,)), rank=2)
    with pytest.raises(ValueError, match="client axes"):
        stacked_lowrank_svd(jnp.ones((3, 8, 4)), jnp.ones((2, 4, 6)), rank=2)
    with pytest.raises(ValueError, match="method"):
        stacked_lowrank_svd(jnp.ones((3, 8, 4)), jnp.ones((3, 4, 6)), rank=2, method="qr")
    with pytest.raises(TypeError, match="typed PRNG key"):
        randomized_svd(l, r, rank=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="oversample"):
        randomized_svd(l, r, rank=2, key=jax.random.key(0), oversample=-1)
    res = lowrank_svd(l, r)
    with pytest.raises(ValueError, match="split"):
        truncate_to_factors(res, 2, split="half")
    with pytest.raises(ValueError, match=">= 1"):
        truncate_to_factors(res, 0)


def test_public_names():
    assert sorted(linalg.__all__) == sorted([
        "SVDResult", "canonicalize_signs", "dense_svd", "lowrank_svd", "randomized_svd",
        "stacked_factors", "stacked_lowrank_svd", "svd_safe", "truncate_to_factors"])
    for name in linalg.__all__:
        assert getattr(linalg, name) is not None


def test_stacked_integer_weights_equal_float_weights():
    rng = np.random.default_rng(17)
    left = jnp.asarray(rng.standard_normal((3, 30, 2)), jnp.float32)
    right = jnp.asarray(rng.standard_normal((3, 2, 20)), jnp.float32)
    a = stacked_lowrank_svd(left, right, jnp.array([3, 1, 2]), rank=3)
    b = stacked_lowrank_svd(left, right, jnp.array([3.0, 1.0, 2.0]), rank=3)
    np.testing.assert_allclose(np.asarray(a.s), np.asarray(b.s), rtol=1e-6)
    with pytest.raises(TypeError, match="weights"):
        stacked_lowrank_svd(left, right, jnp.array([True, False, True]), rank=3)
