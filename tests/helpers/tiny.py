"""A tiny functional model with LoRA slots, for testing the round engine without a real model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax import lora as lora_lib
from fedlora_jax.federated import Task

V, D, L, K_CLASSES = 32, 8, 3, 3
MODULES = ("fc",)


def keys():
    return [f"layer.{i}.fc" for i in range(L)]


def init_base(key):
    ks = jax.random.split(key, L + 1)
    return {"embed": jax.random.normal(ks[0], (V, D)),
            **{f"w{i}": jax.random.normal(ks[i + 1], (D, D)) / np.sqrt(D) for i in range(L)}}


def init_head(key):
    return {"w": 0.1 * jax.random.normal(key, (D, K_CLASSES)), "b": jnp.zeros((K_CLASSES,))}


def shapes():
    return {k: (D, D) for k in keys()}


def forward(base, head, lora, masks, ids, attn, grad_cut, scale=0.5):
    x = base["embed"][ids]
    for i in range(L):
        if isinstance(grad_cut, int):  # static cut: layers below are never differentiated
            x = jax.lax.stop_gradient(x) if i < grad_cut else x
        else:
            x = jnp.where(i < grad_cut, jax.lax.stop_gradient(x), x)
        k = f"layer.{i}.fc"
        h = lora_lib.apply(x, base[f"w{i}"], lora[k], masks[k], scale=scale) if k in lora else x @ base[f"w{i}"]
        x = jnp.tanh(h) + x
    m = attn[..., None].astype(x.dtype)
    pooled = jnp.sum(x * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    return pooled @ head["w"] + head["b"]


def loss(trainable, base, batch, masks, grad_cut, key):
    logits = forward(base, trainable["head"], trainable["lora"], masks, batch["input_ids"],
                     batch["attention_mask"], grad_cut)
    ex = batch["example_mask"].astype(jnp.float32)
    ll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    n = jnp.sum(ex)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * ex)
    return jnp.sum(ll * ex) / jnp.maximum(n, 1.0), {"correct": correct, "count": n}


def add_base_delta(base, deltas):
    out = dict(base)
    for k, d in deltas.items():
        i = int(k.split(".")[1])
        out[f"w{i}"] = base[f"w{i}"] + d
    return out


TASK = Task(loss=loss, add_base_delta=add_base_delta)


def batches(key, c, s, b, t=5):
    k1, k2 = jax.random.split(key)
    ids = jax.random.randint(k1, (c, s, b, t), 0, V)
    labels = jax.random.randint(k2, (c, s, b), 0, K_CLASSES)
    attn = jnp.ones((c, s, b, t), jnp.int32).at[..., -1].set(0)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels,
            "example_mask": jnp.ones((c, s, b), jnp.int32)}
