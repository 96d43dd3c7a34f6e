"""``EncoderConfig.cls_shortcut``: with CLS / pooler pooling the last block runs at the first
position only. Logits and every gradient must equal the full computation, and the compiled
program must actually do less work."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import attention, functional_forward, split_for_round

MODULES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def _models(pooling: str, layers: int = 3):
    cfg = EncoderConfig(vocab_size=60, hidden_size=32, num_layers=layers, num_heads=4, intermediate_size=48,
                        max_position_embeddings=16, num_labels=3, pooling=pooling)
    fast = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    full = EncoderClassifier(dataclasses.replace(cfg, cls_shortcut=False), rngs=nnx.Rngs(0))
    return fast, full


def _inputs():
    ids = jax.random.randint(jax.random.key(5), (4, 10), 1, 60)
    mask = jnp.ones((4, 10), jnp.int32).at[1, 6:].set(0).at[3, 2:].set(0)   # padded keys
    return ids, mask


def _lora(model):
    shapes = {k: (t.in_features, t.out_features) for k, t in model.adapter_targets(MODULES).items()}
    return lora_lib.init(jax.random.key(1), shapes, 4, std=0.2)


def _loss_and_grads(model, lora, masks, **kw):
    g, base, head = split_for_round(model)
    ids, mask = _inputs()

    def loss(lo, hd):
        logits = functional_forward(g, base, hd, ids, mask, lora=lo, masks=masks, scale=0.7, **kw)
        return jnp.sum(jnp.sin(logits) * jnp.arange(1.0, 4.0))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lora, head)


@pytest.mark.parametrize("pooling", ["cls", "pooler"])
@pytest.mark.parametrize("kw", [{}, {"remat": True}, {"grad_cut_layer": 1}, {"grad_cut_layer": jnp.int32(2)}])
def test_logits_and_gradients_equal_full_computation(pooling, kw):
    fast, full = _models(pooling)
    lora = _lora(fast)
    masks = {k: jnp.array([1.0, 1.0, 0.0, 1.0]) for k in lora}
    masks["layer.2.query"] = jnp.zeros(4)                     # a pruned module in the last block
    (v_fast, (gl_fast, gh_fast)), (v_full, (gl_full, gh_full)) = (
        _loss_and_grads(m, lora, masks, **kw) for m in (fast, full))
    np.testing.assert_allclose(float(v_fast), float(v_full), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((gl_fast, gh_fast)), jax.tree.leaves((gl_full, gh_full)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    nonzero = [k for k in lora if k.startswith("layer.2.") and k != "layer.2.query"]
    assert all(float(jnp.abs(gl_fast[k].b).max()) > 0 for k in nonzero)  # last block's LoRA is trained


def test_encode_first_token_only_is_the_first_row():
    fast, _ = _models("cls")
    ids, mask = _inputs()
    lora = _lora(fast)
    full = fast.encode(ids, mask, lora=lora, scale=0.7)
    first = fast.encode(ids, mask, lora=lora, scale=0.7, first_token_only=True)
    assert first.shape == (4, 1, 32)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :1]), rtol=1e-5, atol=1e-6)


def _flops(model):
    g, base, head = split_for_round(model)
    ids, mask = _inputs()
    lora = _lora(model)
    f = jax.jit(jax.grad(lambda lo: jnp.sum(functional_forward(g, base, head, ids, mask, lora=lo, masks=None,
                                                               scale=1.0))))
    ca = f.lower(lora).compile().cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]


def test_shortcut_skips_work_only_for_first_token_pooling():
    fast, full = _models("cls", layers=3)
    saved = 1 - _flops(fast) / _flops(full)
    assert saved > 0.15, saved          # most of one of three blocks, forward and backward
    mean_fast, mean_full = _models("mean", layers=3)
    assert _flops(mean_fast) == pytest.approx(_flops(mean_full), rel=1e-6)


def test_fewer_queries_than_keys_is_refused_when_causal():
    q = jnp.ones((1, 1, 2, 4))
    kv = jnp.ones((1, 3, 2, 4))
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        attention(q, kv, kv, jnp.ones((1, 3)), causal=True)
