"""A tiny random EncoderClassifier round (no files, no network) shared by the reliability tests."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedlora_jax import aggregation
from fedlora_jax import lora as lora_lib
from fedlora_jax.driver.tasks import classification_task
from fedlora_jax.federated import init_server_state, make_round, make_spec
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round


class TinyRound(NamedTuple):
    cfg: EncoderConfig
    round_fn: object
    state: object
    batch: dict
    spec: object
    base: object
    targets: dict


def tiny_config(*, hidden=32, layers=2, seq_len=16, num_labels=3) -> EncoderConfig:
    return EncoderConfig(vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=4,
                         intermediate_size=4 * hidden, max_position_embeddings=max(seq_len, 16),
                         num_labels=num_labels)


def build(seed: int, *, clients=4, chunk=2, steps=2, batch=4, seq_len=16, r_max=4, hidden=32,
          layers=2, lr=1e-2, round_fn=None, **round_kw) -> TinyRound:
    """Everything random (model, global adapter, data) derives from ``seed``.

    ``round_fn``: reuse an already compiled round of the same shapes (the model's graphdef is
    the same for every seed) instead of building a new one."""
    cfg = tiny_config(hidden=hidden, layers=layers, seq_len=seq_len)
    key = jax.random.key(seed)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(seed))
    graphdef, base, head = split_for_round(model)
    targets = model.adapter_targets(["query", "value"])
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    glob = lora_lib.init(jax.random.fold_in(key, 1), shapes, r_max)
    # Non-zero b so that the adapter is active from the first step.
    glob = {k: lora_lib.LoraFactors(f.a, 0.1 * jax.random.normal(jax.random.fold_in(key, 100 + i), f.b.shape))
            for i, (k, f) in enumerate(sorted(glob.items()))}
    agg = aggregation.fedit()
    task = classification_task(graphdef, scale=2.0)
    rf = round_fn if round_fn is not None else make_round(task, agg, optimizer=optax.adamw(lr), chunk_size=chunk,
                                                          **round_kw)
    ids = jax.random.randint(jax.random.fold_in(key, 2), (clients, steps, batch, seq_len), 1, cfg.vocab_size)
    attn = jnp.ones_like(ids).at[..., -3:].set(0)
    labels = jax.random.randint(jax.random.fold_in(key, 3), (clients, steps, batch), 0, cfg.num_labels)
    data = {"input_ids": ids, "attention_mask": attn, "labels": labels,
            "example_mask": jnp.ones((clients, steps, batch), jnp.float32)}
    masks = {k: np.ones((clients, r_max), np.float32) for k in shapes}
    spec = make_spec(masks, num_steps=[steps] * clients, weight=np.arange(1, clients + 1, dtype=np.float32),
                     client_id=np.arange(clients), num_layers=layers,
                     layer_of_key={k: t.layer for k, t in targets.items()})
    return TinyRound(cfg, rf, init_server_state(glob, head, agg), data, spec, base, targets)
