"""Gradient-safe SVD: finite at repeated/zero singular values, exact where distinct."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.linalg import dense_svd, lowrank_svd, stacked_lowrank_svd, svd_safe


def _product(res):
    return res.u @ (res.s[..., None] * res.vt)


def _sign_invariant_loss(res, seed=0, rank=2):
    """Depends on s, on u and vt up to sign, and on a truncated product."""
    rng = np.random.default_rng(seed)
    gu = rng.standard_normal(res.u.shape)
    gv = rng.standard_normal(res.vt.shape)
    c = rng.standard_normal(res.s.shape)
    trunc = res.u[..., :rank] @ (res.s[..., :rank, None] * res.vt[..., :rank, :])
    w = rng.standard_normal(trunc.shape)
    return (jnp.sum(c * res.s) + jnp.sum(gu * res.u**2) + jnp.sum(gv * res.vt**2)
            + jnp.sum(w * trunc))


def _check_vs_central_differences(f, args, n_dirs=3, h=1e-6, rtol=1e-6):
    grads = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
    f = jax.jit(f)
    rng = np.random.default_rng(123)
    for _ in range(n_dirs):
        dirs = [rng.standard_normal(a.shape) for a in args]
        plus = f(*[a + h * d for a, d in zip(args, dirs, strict=True)])
        minus = f(*[a - h * d for a, d in zip(args, dirs, strict=True)])
        fd = (plus - minus) / (2 * h)
        an = sum(np.vdot(np.asarray(g), d) for g, d in zip(grads, dirs, strict=True))
        np.testing.assert_allclose(an, fd, rtol=rtol, atol=1e-7 * max(1.0, abs(fd)))


@pytest.mark.parametrize("shape,rank", [((9, 3, 7), None), ((5, 4, 11), None), ((6, 8, 6), None),
                                        ((10, 5, 8), 2)])
def test_lowrank_safe_grad_matches_finite_differences(x64, shape, rank):
    m, k, n = shape
    rng = np.random.default_rng(1)
    left = jnp.asarray(rng.standard_normal((m, k)))
    right = jnp.asarray(rng.standard_normal((k, n)))
    f = lambda a, b: _sign_invariant_loss(lowrank_svd(a, b, rank=rank, gradient_safe=True))
    _check_vs_central_differences(f, (left, right))


@pytest.mark.parametrize("shape", [(8, 5), (4, 7), (6, 6)])
def test_svd_safe_grad_matches_finite_differences(x64, shape):
    x = jnp.asarray(np.random.default_rng(2).standard_normal(shape))
    f = lambda a: _sign_invariant_loss(svd_safe(a))
    _check_vs_central_differences(f, (x,))


def test_safe_grad_matches_jax_default_where_distinct():
    rng = np.random.default_rng(3)
    left = jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32)
    right = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    f = lambda a, b, gs: _sign_invariant_loss(lowrank_svd(a, b, gradient_safe=gs), rank=3)
    g_safe = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(left, right, True)
    g_jax = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(left, right, False)
    g_dense = jax.jit(jax.grad(lambda a, b: _sign_invariant_loss(dense_svd(a, b), rank=3),
                       argnums=(0, 1)))(left, right)
    for gs, gj, gd in zip(g_safe, g_jax, g_dense, strict=True):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gj), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-3, atol=1e-3)


def _repeated_factors(seed, m=12, k=4, n=9, value=2.0):
    """left @ right = value * Q1 Q2^T: all singular values equal ``value``."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return jnp.asarray(value * q1, jnp.float32), jnp.asarray(q2.T, jnp.float32)


def test_repeated_singular_values_product_gradient_exact():
    left, right = _repeated_factors(4)
    w = jnp.asarray(np.random.default_rng(5).standard_normal((12, 9)), jnp.float32)
    f = lambda a, b: jnp.sum(w * _product(lowrank_svd(a, b, gradient_safe=True)))
    ga, gb = jax.jit(jax.grad(f, argnums=(0, 1)))(left, right)
    # d/dL sum(W * L R) = W R^T, d/dR = L^T W.
    np.testing.assert_allclose(np.asarray(ga), np.asarray(w @ right.T), atol=1e-4)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(left.T @ w), atol=1e-4)
    # Dense safe SVD of a full-rank square matrix with values (3, 2, 2, 2, 1, 1).
    rng = np.random.default_rng(5)
    q1, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    q2, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    x = jnp.asarray(q1 * np.array([3.0, 2, 2, 2, 1, 1]) @ q2.T, jnp.float32)
    w6 = jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)
    gx = jax.jit(jax.grad(lambda x: jnp.sum(w6 * _product(svd_safe(x)))))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(w6), atol=1e-4)


def test_repeated_singular_values_finite_for_vector_losses():
    left, right = _repeated_factors(6)
    f = lambda a, b: _sign_invariant_loss(lowrank_svd(a, b, gradient_safe=True))
    for g in jax.jit(jax.grad(f, argnums=(0, 1)))(left, right):
        assert np.isfinite(np.asarray(g)).all()
    g = jax.jit(jax.grad(lambda x: _sign_invariant_loss(svd_safe(x))))(left @ right)
    assert np.isfinite(np.asarray(g)).all()


def test_zero_singular_values_finite_and_s_gradient_exact():
    rng = np.random.default_rng(7)
    left = rng.standard_normal((12, 4)).astype(np.float32)
    left[:, 2:] = 0.0  # masked slots: two zero singular values
    right = rng.standard_normal((4, 9)).astype(np.float32)
    l, r = jnp.asarray(left), jnp.asarray(right)
    # sum(s^2) = ||L R||_F^2 -> d/dL = 2 (L R) R^T, even at the rank-deficient point.
    f = lambda a, b: jnp.sum(lowrank_svd(a, b, gradient_safe=True).s ** 2)
    ga, gb = jax.jit(jax.grad(f, argnums=(0, 1)))(l, r)
    np.testing.assert_allclose(np.asarray(ga), 2 * (left @ right) @ right.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gb), 2 * left.T @ (left @ right), rtol=1e-4, atol=1e-4)
    zero_l, zero_r = jnp.zeros((12, 4)), jnp.zeros((4, 9))
    loss = lambda a, b: _sign_invariant_loss(lowrank_svd(a, b, gradient_safe=True))
    grad_loss = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for args in ((l, r), (l, zero_r), (zero_l, zero_r)):
        for g in grad_loss(*args):
            assert np.isfinite(np.asarray(g)).all()
    gx = jax.jit(jax.grad(lambda x: _sign_invariant_loss(svd_safe(x))))(jnp.zeros((6, 5)))
    assert np.isfinite(np.asarray(gx)).all()


def test_stacked_safe_grad_wrt_weights(x64):
    rng = np.random.default_rng(8)
    left = jnp.asarray(rng.standard_normal((3, 14, 2)))
    right = jnp.asarray(rng.standard_normal((3, 2, 10)))
    w0 = jnp.asarray([0.5, 0.3, 0.2])
    for method in ("lowrank", "dense"):
        f = lambda w, method=method: _sign_invariant_loss(
            stacked_lowrank_svd(left, right, w, rank=4, method=method, gradient_safe=True), rank=3)
        _check_vs_central_differences(f, (w0,))


def test_grad_under_jit_and_vmap():
    rng = np.random.default_rng(9)
    left = jnp.asarray(rng.standard_normal((3, 10, 4)), jnp.float32).at[0].set(0.0)
    right = jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32)
    f = lambda a, b: jnp.sum(lowrank_svd(a, b, rank=2, gradient_safe=True).s)
    g_vmap = jax.jit(jax.vmap(jax.grad(f)))(left, right)
    g_one = jax.jit(jax.grad(f))
    g_loop = np.stack([np.asarray(g_one(left[i], right[i])) for i in range(3)])
    assert np.isfinite(np.asarray(g_vmap)).all()
    np.testing.assert_allclose(np.asarray(g_vmap), g_loop, rtol=1e-4, atol=1e-5)
