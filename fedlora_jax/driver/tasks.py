"""Bridges from NNX models to the round engine: the :class:`Task` of each task mode (encoder
classification, causal LM, classification as generation) and their evaluations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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


def _train_forward(graphdef, *, scale: float, remat: bool):
    """``forward(trainable, base, batch, masks, grad_cut) -> model output`` for a task's loss
    (``remat=True``: each transformer block rematerialised in the backward pass)."""
    extra = {"remat": True} if remat else {}

    def forward(trainable, base, batch, masks, grad_cut):
        return functional_forward(graphdef, base, trainable["head"], batch["input_ids"], batch["attention_mask"],
                                  lora=trainable["lora"], masks=masks, scale=scale, grad_cut_layer=grad_cut, **extra)

    return forward


def classification_task(graphdef, *, scale: float, label_smoothing: float = 0.0, remat: bool = False) -> Task:
    """Cross-entropy on an encoder classifier; batches hold ``input_ids [B, T]``,
    ``attention_mask [B, T]``, ``labels [B]`` and ``example_mask [B]`` (padding rows = 0).
    ``remat=True`` rematerialises each transformer block in the backward pass."""
    forward = _train_forward(graphdef, scale=scale, remat=remat)

    def loss(trainable, base, batch, masks, grad_cut, key):
        del key
        logits = forward(trainable, base, batch, masks, grad_cut).astype(jnp.float32)
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


# ------------------------------------------------------------------- causal language models

IGNORE_INDEX = -100  # == fedlora_jax.data.IGNORE_INDEX (targets that carry no loss)


def token_nll(logits, labels, example_mask):
    """Next-token losses of a causal LM: position ``t`` predicts ``labels[:, t + 1]``.

    Args:
      logits: ``[B, T, V]``.
      labels: ``[B, T]`` int targets, not shifted (``input_ids`` with :data:`IGNORE_INDEX` on
        padding and, for instruction data, on the prompt: what the data layer produces).
      example_mask: ``[B]`` (0 = padding row).

    Returns:
      ``(nll, valid, hit)``, each ``[B, T - 1]`` float32: the token NLL (0 where not
      counted), 1 for a counted target (not ignored, real row), 1 for a counted target that is
      the argmax prediction.
    """
    lg = logits[:, :-1].astype(jnp.float32)
    tgt = labels[:, 1:]
    valid = (tgt != IGNORE_INDEX) & (example_mask[:, None] > 0)
    safe = jnp.where(valid, tgt, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(lg, safe)
    vf = valid.astype(jnp.float32)
    hit = (jnp.argmax(lg, -1) == safe).astype(jnp.float32) * vf
    return nll * vf, vf, hit


def causal_lm_task(graphdef, *, scale: float, remat: bool = False) -> Task:
    """Next-token cross-entropy of a decoder (Llama / Qwen2 / GPT-2).

    Batches hold ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]`` (token
    targets with :data:`IGNORE_INDEX` on padding and prompt tokens, see
    :func:`fedlora_jax.data.tokenize`) and ``example_mask [B]``. The loss is the mean over the
    counted target tokens of the step's batch; ``aux = {"correct", "count"}`` counts tokens
    (next-token accuracy = correct / count). Whole-text LM (every token a target) and
    instruction tuning (loss on the response only) differ only in the labels. The model has
    no trainable head (the LM head is frozen in the base): ``trainable["head"]`` is the empty
    state of :func:`~fedlora_jax.models.split_for_round`.
    """
    forward = _train_forward(graphdef, scale=scale, remat=remat)

    def loss(trainable, base, batch, masks, grad_cut, key):
        del key
        logits = forward(trainable, base, batch, masks, grad_cut)
        nll, valid, hit = token_nll(logits, batch["labels"], batch["example_mask"])
        n = jnp.sum(valid)
        return jnp.sum(nll) / jnp.maximum(n, 1.0), {"correct": jnp.sum(hit), "count": n}

    return Task(loss=loss, add_base_delta=add_base_delta)


def make_lm_evaluate(graphdef, *, scale: float, num_groups: int | None = None):
    """``evaluate(base, head, lora, masks, eval_batches) -> dict``, one jit.

    ``eval_batches`` leaves are ``[K, B, ...]`` (``input_ids``, ``attention_mask``, ``labels
    [K, B, T]``, ``example_mask [K, B]``), mapped with ``lax.map`` (memory: one batch). Returns
    ``{"nll", "perplexity", "accuracy", "tokens"}``: the mean token NLL over every counted
    target of the set, ``exp(nll)``, next-token accuracy and the number of counted tokens.

    With ``num_groups = G`` the batches also hold ``group [K, B]`` (e.g. the client each test
    text belongs to) and the result adds ``group_nll``, ``group_accuracy``, ``group_tokens``
    (``[G]``; NaN NLL/accuracy for a group without tokens) and ``group_perplexity``.
    """

    def evaluate(base, head, lora, masks, batches):
        def one(b):
            logits = functional_forward(graphdef, base, head, b["input_ids"], b["attention_mask"],
                                        lora=lora, masks=masks, scale=scale)
            nll, valid, hit = token_nll(logits, b["labels"], b["example_mask"])
            per_ex = (jnp.sum(nll, -1), jnp.sum(hit, -1), jnp.sum(valid, -1))       # [B] each
            out = tuple(jnp.sum(x) for x in per_ex)
            if num_groups is not None:
                onehot = jax.nn.one_hot(b["group"], num_groups, dtype=jnp.float32)  # [B, G]
                out = out + tuple(x @ onehot for x in per_ex)
            return out

        res = jax.lax.map(one, batches)
        nll, hit, n = (jnp.sum(x) for x in res[:3])
        tot = jnp.maximum(n, 1.0)
        out = {"nll": nll / tot, "perplexity": jnp.exp(nll / tot), "accuracy": hit / tot, "tokens": n}
        if num_groups is not None:
            g_nll, g_hit, g_n = (jnp.sum(x, 0) for x in res[3:])
            has = g_n > 0
            out["group_nll"] = jnp.where(has, g_nll / jnp.maximum(g_n, 1.0), jnp.nan)
            out["group_accuracy"] = jnp.where(has, g_hit / jnp.maximum(g_n, 1.0), jnp.nan)
            out["group_perplexity"] = jnp.exp(out["group_nll"])
            out["group_tokens"] = g_n
        return out

    return jax.jit(evaluate)


def make_choice_evaluate(graphdef, *, scale: float, num_classes: int):
    """Classification as generation: score each class's label word, one jit.

    Each example is a prompt and ``C = num_classes`` candidate answers (the label words);
    ``eval_batches`` leaves are ``input_ids, attention_mask, labels: [K, B, C, T]``
    (candidate ``c`` = prompt + label word ``c``, labels :data:`IGNORE_INDEX` except on the
    answer tokens), ``class_labels [K, B]`` and ``example_mask [K, B]``.

    The score of candidate ``c`` is its answer's log-likelihood given the prompt (the *sum*
    of its token log-probabilities: a label word of several tokens is scored as a whole);
    the prediction is the highest-scoring label word. Returns ``(accuracy, loss,
    per_class_accuracy [num_classes])`` like :func:`make_evaluate` with ``num_classes``, where
    ``loss`` is the cross-entropy of the implied classifier ``softmax(scores)``.
    """

    def evaluate(base, head, lora, masks, batches):
        def one(b):
            bsz, c, t = b["input_ids"].shape
            flat = lambda x: x.reshape(bsz * c, t)
            logits = functional_forward(graphdef, base, head, flat(b["input_ids"]), flat(b["attention_mask"]),
                                        lora=lora, masks=masks, scale=scale)
            ones = jnp.ones((bsz * c,), jnp.float32)
            nll, _, _ = token_nll(logits, flat(b["labels"]), ones)
            scores = -jnp.sum(nll, -1).reshape(bsz, c)                  # [B, C] log-likelihoods
            return _choice_counts(scores, b, num_classes)

        return _choice_totals(jax.lax.map(one, batches))

    return jax.jit(evaluate)


def _choice_counts(scores, b, num_classes: int):
    """Per batch: hits, summed cross-entropy of ``softmax(scores)``, examples, per-class hits and
    counts, from ``scores [B, C]`` and the batch's ``class_labels`` / ``example_mask``."""
    y = b["class_labels"]
    ex = b["example_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, y)
    hit = (jnp.argmax(scores, -1) == y) * ex
    onehot = jax.nn.one_hot(y, num_classes) * ex[:, None]
    return jnp.sum(hit), jnp.sum(ce * ex), jnp.sum(ex), hit @ onehot, jnp.sum(onehot, 0)


def _choice_totals(counts):
    """``(accuracy, loss, per_class_accuracy)`` from the stacked :func:`_choice_counts`."""
    correct, loss, n, cls_correct, cls_n = counts
    tot = jnp.maximum(jnp.sum(n), 1.0)
    cls_correct, cls_n = jnp.sum(cls_correct, 0), jnp.sum(cls_n, 0)
    per_class = jnp.where(cls_n > 0, cls_correct / jnp.maximum(cls_n, 1.0), jnp.nan)
    return jnp.sum(correct) / tot, jnp.sum(loss) / tot, per_class


def make_shared_prompt_choice_evaluate(graphdef, *, scale: float, num_classes: int, answer_ids, answer_mask):
    """:func:`make_choice_evaluate` for candidates that share their prompt
    (:func:`fedlora_jax.data.tokenization.shared_prompt_choices`), one jit: each prompt is run
    once through the model's cached path (``prefill``), the first token of every answer is
    scored from the prompt's last logits, and the rest of answer ``k`` by ``A - 1`` cached decode
    steps from the same cache. Same scores as the whole-candidate evaluator, for about
    ``(P + K (A - 1)) / (K T)`` of its tokens.

    Args:
      answer_ids, answer_mask: ``[K, A]`` answer tokens and their mask (static).
    ``batches``: ``input_ids, attention_mask [N, B, P]`` (the prompts), ``class_labels`` and
    ``example_mask [N, B]``. Returns ``(accuracy, loss, per_class_accuracy)``.
    """
    answer_ids, answer_mask = np.asarray(answer_ids, np.int32), np.asarray(answer_mask, np.float32)
    k_answers, width = answer_ids.shape
    if k_answers != num_classes:
        raise ValueError(f"answer_ids has {k_answers} answers for num_classes={num_classes}")

    def evaluate(base, head, lora, masks, batches):
        model = nnx.merge(graphdef, base, head)
        kw = dict(lora=lora, masks=masks, scale=scale)

        def one(b):
            ids, am = b["input_ids"], b["attention_mask"]
            bsz, p = ids.shape
            rows = jnp.arange(bsz)
            lens = jnp.sum(am != 0, -1).astype(jnp.int32)
            logits, cache = model.prefill(ids, am, cache_len=p + width - 1, **kw)
            first = jax.nn.log_softmax(logits[rows, lens - 1], -1)                   # [B, V]
            valid0 = jnp.pad(am != 0, ((0, 0), (0, width - 1)))
            scores = []
            for k in range(k_answers):
                lp, c, valid = first[:, answer_ids[k, 0]], cache, valid0
                for j in range(1, width):
                    if answer_mask[k, j] == 0:
                        break
                    pos = lens + j - 1                                                # slot of token j - 1
                    valid = valid.at[rows, pos].set(True)
                    tok = jnp.full((bsz,), answer_ids[k, j - 1], jnp.int32)
                    step_logits, c = model.decode_step(tok, pos, c, valid, **kw)
                    lp = lp + jax.nn.log_softmax(step_logits, -1)[:, answer_ids[k, j]]
                scores.append(lp)
            return _choice_counts(jnp.stack(scores, -1), b, num_classes)

        return _choice_totals(jax.lax.map(one, batches))

    return jax.jit(evaluate)
