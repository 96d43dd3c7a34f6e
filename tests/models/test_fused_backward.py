"""The hand-written backward passes (LayerNorm, attention), the erf GELU, and the XLA:CPU
cotangent barrier: same values and gradients as the plain formulas, and the barrier really
keeps XLA from building the duplicated cross-layer fusions it exists to prevent."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import common, norm_vjp
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round


def _plain_layer_norm(x, scale, bias, eps):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


@pytest.mark.parametrize("barrier", [False, True])
def test_layer_norm_values_and_gradients_match_autodiff(barrier):
    k = jax.random.split(jax.random.key(0), 4)
    x = 3.0 + 2.0 * jax.random.normal(k[0], (2, 5, 16))
    scale = 1.0 + 0.1 * jax.random.normal(k[1], (16,))
    bias = 0.1 * jax.random.normal(k[2], (16,))
    w = jax.random.normal(k[3], (2, 5, 16))

    def ours(x, s, b):
        return jnp.sum(jnp.sin(norm_vjp.layer_norm(x, s, b, eps=1e-5, barrier=barrier)) * w)

    def ref(x, s, b):
        return jnp.sum(jnp.sin(_plain_layer_norm(x, s, b, 1e-5)) * w)

    np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), rtol=1e-6, atol=1e-5)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_layer_norm_keeps_input_dtype():
    x = jnp.ones((3, 8), jnp.bfloat16)
    y = norm_vjp.layer_norm(x, jnp.ones(8), jnp.zeros(8), eps=1e-5)
    assert y.dtype == jnp.bfloat16


def _grad_hlo(barrier: bool, batched: bool) -> str:
    # scale/bias are runtime arguments (as frozen parameters are in the round): a constant
    # anchor would let XLA fold the cond away.
    def loss(x, scale, bias):
        for _ in range(3):
            x = norm_vjp.layer_norm(x * 1.5 + 0.1, scale, bias, eps=1e-5, barrier=barrier)
        return jnp.sum(x ** 2)

    f = jax.grad(loss)
    x = jnp.ones((4, 16))
    if batched:                       # clients stacked: x batched, the frozen scale is not
        f, x = jax.vmap(f, in_axes=(0, None, None)), jnp.ones((3, 4, 16))
    return jax.jit(f).lower(x, jnp.ones(16), jnp.zeros(16)).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier is an XLA:CPU workaround")
@pytest.mark.parametrize("batched", [False, True])
def test_barrier_survives_compilation_and_vmap(batched):
    assert len(re.findall(r" conditional\(", _grad_hlo(True, batched))) == 3
    assert " conditional(" not in _grad_hlo(False, batched)


def _barrier_enabled(mode: str) -> bool:
    """Whether the LayerNorms of an encoder built with ``norm_barrier=mode`` use the barrier."""
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                        max_position_embeddings=16, norm_barrier=mode)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    flags = {n.use_barrier for n in (model.embed_norm, model.layers[0].attn_norm, model.layers[0].ffn_norm)}
    assert len(flags) == 1 and (model.config.norm_barrier == "on") is next(iter(flags))
    return next(iter(flags))


def test_barrier_mode_from_config():
    assert _barrier_enabled("off") is False
    assert _barrier_enabled("on") is True
    assert _barrier_enabled("auto") is (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="norm_barrier"):
        _barrier_enabled("sometimes")


def _max_fusion_operands(hlo: str) -> int:
    ops = [m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind=kLoop", hlo)]
    return max(ops)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion behaviour")
def test_encoder_backward_has_no_cross_layer_fusions():
    """Regression test for the quadratic backward: without the barrier, XLA:CPU fuses the
    LayerNorm-backward chains of all blocks above into each block's fusions (operand counts
    grow with depth: 105 at 6 layers here); with it they stay per-block (12)."""
    # hidden 128 / T 16: at toy sizes (hidden 32) XLA:CPU inlines the dots into loop fusions
    # and the pattern does not arise
    ids = jnp.ones((2, 16), jnp.int32)
    am = jnp.ones((2, 16), jnp.int32)

    def compiled(mode):
        cfg = EncoderConfig(vocab_size=50, hidden_size=128, num_layers=6, num_heads=2, intermediate_size=256,
                            max_position_embeddings=16, num_labels=3, norm_barrier=mode)
        model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
        graphdef, base, head = split_for_round(model)
        shapes = {k: (t.in_features, t.out_features) for k, t in model.adapter_targets(["query", "value"]).items()}
        lora = lora_lib.init(jax.random.key(1), shapes, 4)

        def loss(lora, base):
            logits = common.functional_forward(graphdef, base, head, ids, am, lora=lora, masks=None, scale=1.0)
            return jnp.sum(logits ** 2)

        return jax.jit(jax.grad(loss)).lower(lora, base).compile().as_text()

    with_barrier, without = _max_fusion_operands(compiled("on")), _max_fusion_operands(compiled("off"))
    assert with_barrier < 40 < without, (with_barrier, without)


def test_gelu_matches_jax_nn_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    # the erf form (transformers' formula) differs from jax's erfc form by < 1e-6 in the far
    # negative tail, where GELU itself is ~1e-7
    np.testing.assert_allclose(common.gelu(x, False), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda t: common.gelu(t, False)))(x),
                               jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x), atol=1e-6)
    np.testing.assert_allclose(common.gelu(x, True), jax.nn.gelu(x, approximate=True), atol=1e-7)


@pytest.mark.parametrize("causal,hq,hk", [(False, 4, 4), (True, 4, 4), (True, 4, 2), (False, 6, 1)])
def test_attention_matches_dot_product_attention(causal, hq, hk):
    b, t, d = 2, 7, 8
    k0 = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(k0[0], (b, t, hq, d))
    k = jax.random.normal(k0[1], (b, t, hk, d))
    v = jax.random.normal(k0[2], (b, t, hk, d))
    w = jax.random.normal(k0[3], (b, t, hq, d))
    am = jnp.array([[1] * t, [0, 0] + [1] * (t - 2)], jnp.int32)      # left padding in row 1

    def ref(q, k, v):
        mask = (am != 0)[:, None, None, :]
        if causal:
            mask = mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    ours = lambda q, k, v: common.attention(q, k, v, am, causal=causal)
    valid = np.ones((b, t, 1, 1), bool)
    if causal:   # padded queries that see no key: arbitrary (finite) in both; compare the rest
        valid[1, :2] = False
    out = ours(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref(q, k, v), 0), atol=2e-6)
    sel = jnp.asarray(valid, jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * w * sel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * w * sel), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)
