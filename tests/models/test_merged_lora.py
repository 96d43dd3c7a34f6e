"""``Dense``'s folded-kernel LoRA path (``FEDLORA_JAX_MERGED_LORA``) against the low-rank path:
same logits and gradients through a whole encoder, per client under ``vmap``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import functional_forward, merged_lora_enabled, split_for_round

MODULES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def _setup():
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                        max_position_embeddings=16, num_labels=3)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    g, base, head = split_for_round(model)
    shapes = {k: (t.in_features, t.out_features) for k, t in model.adapter_targets(MODULES).items()}
    one = lora_lib.init(jax.random.key(1), shapes, 4, scheme="svd_form", std=0.3)
    one = {k: f._replace(e=jnp.linspace(0.5, 1.5, 4)) for k, f in one.items()}
    lora = jax.tree.map(lambda t: jnp.stack([t, -t]), one)                       # two clients
    masks = {k: jnp.array([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) for k in shapes}
    ids = jax.random.randint(jax.random.key(2), (2, 3, 8), 1, 50)
    am = jnp.ones((2, 3, 8), jnp.int32).at[0, 1, 5:].set(0)

    def loss(lo, m, i, a):
        return jnp.sum(jnp.cos(functional_forward(g, base, head, i, a, lora=lo, masks=m, scale=0.5)))

    grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))
    return grads, (lora, masks, ids, am), (g, base, head, ids[0], am[0], one)


def test_merged_path_equals_low_rank_path_under_vmap(monkeypatch):
    grads, args, _ = _setup()
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", "on")
    v_on, g_on = grads(*args)
    grads, args, _ = _setup()                                  # re-trace with the other path
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", "off")
    v_off, g_off = grads(*args)
    np.testing.assert_allclose(np.asarray(v_on), np.asarray(v_off), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_on["layer.1.ffn_out"].e[0]).max()) > 0          # trained, not trivially 0


def _custom_vjp_calls(env, monkeypatch) -> int:
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", env)
    _, _, (g, base, head, ids, am, one) = _setup()
    jaxpr = jax.make_jaxpr(lambda lo: functional_forward(g, base, head, ids, am, lora=lo, masks=None,
                                                         scale=0.5))(one)
    return str(jaxpr).count("custom_vjp_call")


def test_switch_selects_the_path(monkeypatch):
    n_modules = 2 * len(MODULES)
    assert _custom_vjp_calls("on", monkeypatch) - _custom_vjp_calls("off", monkeypatch) == n_modules


def test_switch_modes(monkeypatch):
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", "auto")
    assert merged_lora_enabled(jnp.float32) == (jax.default_backend() == "cpu")
    assert not merged_lora_enabled(jnp.bfloat16)
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", "on")
    assert merged_lora_enabled(jnp.float32) and not merged_lora_enabled(jnp.bfloat16)
    monkeypatch.setenv("FEDLORA_JAX_MERGED_LORA", "sometimes")
    with pytest.raises(ValueError, match="FEDLORA_JAX_MERGED_LORA must be one of"):
        merged_lora_enabled(jnp.float32)
