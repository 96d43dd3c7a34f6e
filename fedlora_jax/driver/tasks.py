"""Bridges from NNX models to the round engine: the classification :class:`Task` and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.federated import Task
from fedlora_jax.models.common import functional_forward


def add_base_delta(base_state, deltas: dict):
    """Add dense updates ``{"layer.{i}.{module}": [N, M]}`` to the base kernels of an NNX state.

    Used by aggregators that fold into the base (FedEx-LoRA, FLoRA). Pure: returns a new state.
    """

    def add(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if len(names) >= 4 and names[0] == "layers" and names[3] == "kernel":
            k = f"layer.{names[1]}.{names[2]}"
            if k in deltas:
                return (leaf.astype(jnp.float32) + deltas[k]).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(add, base_state)


def classification_task(graphdef, *, scale: float, label_smoothing: float = 0.0, remat: bool = False) -> Task:
    """Cross-entropy on an encoder classifier; batches hold ``input_ids [B, T]``,
    ``attention_mask [B, T]``, ``labels [B]`` and ``example_mask [B]`` (padding rows = 0).
    ``remat=True`` rematerialises each transformer block in the backward pass."""
    extra = {"remat": True} if remat else {}

    def loss(trainable, base, batch, masks, grad_cut, key):
        del key
        logits = functional_forward(graphdef, base, trainable["head"], batch["input_ids"],
                                    batch["attention_mask"], lora=trainable["lora"], masks=masks,
                                    scale=scale, grad_cut_layer=grad_cut, **extra)
        logits = logits.astype(jnp.float32)
        n_cls = logits.shape[-1]
        labels = jax.nn.one_hot(batch["labels"], n_cls)
        if label_smoothing:
            labels = optax.smooth_labels(labels, label_smoothing)
        ll = optax.softmax_cross_entropy(logits, labels)
        ex = batch["example_mask"].astype(jnp.float32)
        n = jnp.sum(ex)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * ex)
        return jnp.sum(ll * ex) / jnp.maximum(n, 1.0), {"correct": correct, "count": n}

    return Task(loss=loss, add_base_delta=add_base_delta)


def make_evaluate(graphdef, *, scale: float, num_classes: int | None = None):
    """``evaluate(base, head, lora, masks, eval_batches) -> (accuracy, loss)``, one jit.

    ``eval_batches`` leaves are ``[K, B, ...]``; batches go through ``lax.map`` so memory is
    one batch. ``masks`` may be ``None`` (all ranks). With ``num_classes`` it also returns the
    per-class accuracy ``[num_classes]`` (NaN for a class absent from the set).
    """

    def evaluate(base, head, lora, masks, batches):
        def one(b):
            logits = functional_forward(graphdef, base, head, b["input_ids"], b["attention_mask"],
                                        lora=lora, masks=masks, scale=scale).astype(jnp.float32)
            ex = b["example_mask"].astype(jnp.float32)
            ll = optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"])
            hit = (jnp.argmax(logits, -1) == b["labels"]) * ex
            out = (jnp.sum(hit), jnp.sum(ll * ex), jnp.sum(ex))
            if num_classes is not None:
                onehot = jax.nn.one_hot(b["labels"], num_classes) * ex[:, None]
                out = out + (hit @ onehot, jnp.sum(onehot, axis=0))
            return out

        res = jax.lax.map(one, batches)
        correct, loss, n = res[:3]
        tot = jnp.maximum(jnp.sum(n), 1.0)
        if num_classes is None:
            return jnp.sum(correct) / tot, jnp.sum(loss) / tot
        cls_correct, cls_n = jnp.sum(res[3], 0), jnp.sum(res[4], 0)
        per_class = jnp.where(cls_n > 0, cls_correct / jnp.maximum(cls_n, 1.0), jnp.nan)
        return jnp.sum(correct) / tot, jnp.sum(loss) / tot, per_class

    return jax.jit(evaluate)


def client_accuracies(per_class_accuracy, client_label_hist):
    """Per-client accuracy of the global model under each client's label distribution:
    ``acc_c = sum_k p_c(k) acc(k)`` with ``p_c`` the client's label histogram (normalised) and
    ``acc(k)`` the global test accuracy on class ``k`` (classes absent from the test set are
    skipped). ``client_label_hist: [K_clients, num_classes]`` -> ``[K_clients]``."""
    import numpy as np

    acc = np.asarray(per_class_accuracy, np.float64)
    h = np.asarray(client_label_hist, np.float64)
    ok = np.isfinite(acc)
    h = h[:, ok]
    return (h @ acc[ok]) / np.maximum(h.sum(1), 1.0)
