"""Differentiability: jax.grad w.r.t. weights and client factors == central finite differences (float64).

Every registered method is tested at a generic point (distinct weights, nonzero products,
distinct singular values). Documented exceptions (tested here for finiteness only where the
math has a kink): HetLoRA's norm weights at a zero product (gradient set to 0 there), the
REP-COPY donor choice (piecewise constant), FlexLoRA at degenerate singular values (the
gradient-safe SVD rule gives a finite choice).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aggregation._agg_cases import build, make_case, params_marking_variants_slow

from fedlora_jax import aggregation as ag
from fedlora_jax.lora import LoraFactors

KEYS = ("layer.0.query", "stack.ffn")


def _setup(cfg):
    glob, clients, w, masks, extras = make_case(3, with_e=cfg[3], dtype=jnp.float64)
    sub = lambda t: {k: t[k] for k in KEYS}
    glob, clients, masks = sub(glob), sub(clients), sub(masks)
    extras = {"scores": sub(extras["scores"])}
    agg = build(cfg)
    state = agg.init(glob)
    rng = np.random.default_rng(11)
    coef = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), agg.aggregate(
        glob, clients, w.astype(jnp.float64), masks, state, extras=extras))

    def loss(w, a, b):
        cl = {k: LoraFactors(a[k], b[k], clients[k].e) for k in KEYS}
        out = agg.aggregate(glob, cl, w, masks, state, extras=extras)
        leaves = jax.tree.leaves(jax.tree.map(lambda x, c: jnp.sum(jnp.sin(c * x)), out, coef))
        return sum(leaves)

    x0 = (w.astype(jnp.float64), {k: clients[k].a for k in KEYS}, {k: clients[k].b for k in KEYS})
    return loss, x0


@pytest.mark.parametrize("cfg", params_marking_variants_slow())
def test_grad_matches_central_differences(cfg, x64):
    loss, x0 = _setup(cfg)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*x0)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    rng = np.random.default_rng(5)
    v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), x0)
    h = 1e-5
    plus = jax.tree.map(lambda x, d: x + h * d, x0, v)
    minus = jax.tree.map(lambda x, d: x - h * d, x0, v)
    fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * h)
    an = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True))
    np.testing.assert_allclose(an, fd, rtol=1e-5, atol=1e-7)
    # and per argument: weights alone
    vw = (v[0], jax.tree.map(jnp.zeros_like, v[1]), jax.tree.map(jnp.zeros_like, v[2]))
    plus = jax.tree.map(lambda x, d: x + h * d, x0, vw)
    minus = jax.tree.map(lambda x, d: x - h * d, x0, vw)
    fdw = (float(loss(*plus)) - float(loss(*minus))) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(grads[0], v[0])), fdw, rtol=1e-5, atol=1e-7)


def test_hetlora_norm_kink_gives_finite_gradient(x64):
    """A client with b = 0 sits at the norm's kink: the gradient is finite (0 from the norm)."""
    glob, clients, w, masks, _ = make_case(3, dtype=jnp.float64)
    k = "layer.0.query"
    f = clients[k]
    f = LoraFactors(f.a, f.b.at[1].set(0.0))
    agg = ag.zero_padding()

    def loss(b):
        out, _ = agg.aggregate({k: glob[k]}, {k: LoraFactors(f.a, b)}, w, {k: masks[k]}, agg.init(glob))
        return jnp.sum(jnp.sin(out[k].a)) + jnp.sum(out[k].b ** 2)

    g = jax.grad(loss)(f.b)
    assert np.all(np.isfinite(np.asarray(g)))


def test_flexlora_degenerate_spectrum_gradient_is_finite(x64):
    """Identical rank-1 clients: many zero singular values; gradient-safe SVD stays finite."""
    glob, clients, w, masks, _ = make_case(3, ranks=(1, 1, 1, 1), identical=True, dtype=jnp.float64)
    k = "layer.0.query"
    agg = ag.flexlora()

    def loss(w):
        out, _ = agg.aggregate({k: glob[k]}, {k: clients[k]}, w, {k: masks[k]}, agg.init(glob))
        return jnp.sum((out[k].a @ out[k].b) ** 2)

    g = jax.grad(loss)(w.astype(jnp.float64))
    assert np.all(np.isfinite(np.asarray(g)))
