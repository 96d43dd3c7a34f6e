"""The global model at evaluation, and generation from it: the pieces every task mode's
evaluator and the end-of-run samples share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import data as data_lib
from fedlora_jax.federated import ServerState, effective_base

#: Key stream of the end-of-run generation samples: ``fold_in(key(seed), GENERATE_STREAM)``.
GENERATE_STREAM = 20_000_003


def eval_masks(setup, state: ServerState):
    """Masks of the global model at evaluation (the algorithm's, e.g. FedARA's ``z``), or ``None``."""
    m = setup.algo.eval_masks(state.algo)
    return None if m is None else {k: jnp.asarray(v) for k, v in m.items()}


def evaluate_global(setup, state: ServerState, evaluate, test_batches):
    """``evaluate(...)`` of the global model: the base with any folded update, the global head
    and adapter under :func:`eval_masks`."""
    base = effective_base(setup.task, setup.base, state.agg_state)
    return evaluate(base, state.head, state.lora, eval_masks(setup, state), test_batches)


def sample_rows(num_examples: int, n: int) -> np.ndarray:
    """``[min(n, num_examples)]`` row indices evenly spaced over ``0 .. num_examples - 1`` (the
    first and the last included): test sets in client order (natural clients) give prompts from
    many clients, not the first few."""
    n = min(n, num_examples)
    return np.unique(np.linspace(0, num_examples - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def sample_prompts(tok, n: int):
    """``n`` examples of ``tok`` (:func:`sample_rows`) as generation prompts: the prompt tokens
    (those before the first target) of instruction data, else the first half of the text.
    Returns ``(ids [G, T], mask [G, T], prompt_lens [G], lens [G], rows [G])``."""
    rows = sample_rows(tok.num_examples, n)
    ids, mask, labels = (np.asarray(x)[rows] for x in tok)
    lens = mask.sum(-1)
    target = labels != data_lib.IGNORE_INDEX
    first = np.where(target.any(-1), target.argmax(-1), lens)
    plen = np.where(first > 0, first, np.maximum(lens // 2, 1)).clip(1, None)
    pmask = (np.arange(ids.shape[1])[None] < plen[:, None]).astype(np.int32)
    return np.where(pmask > 0, ids, 0).astype(np.int32), pmask, plen, lens, rows


def generate_samples(setup, state: ServerState) -> list[dict]:
    """Generate from the sample prompts with the global model (one jit): a list of
    ``{"prompt", "generated", "reference"}`` texts (and ``"client"`` with natural clients)."""
    from fedlora_jax.models.generate import make_generate

    cfg = setup.cfg
    ids, mask, plen, lens, rows, tok = setup.samples
    tokenizer = setup.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    gen = make_generate(setup.graphdef, max_new_tokens=cfg.generate_max_new_tokens,
                        temperature=float(cfg.generate_temperature), eos_id=None if eos is None else int(eos),
                        pad_id=0 if pad is None else int(pad))
    base = effective_base(setup.task, setup.base, state.agg_state)
    key = jax.random.fold_in(jax.random.key(cfg.seed), GENERATE_STREAM)
    out = gen(base, state.head, jnp.asarray(ids), jnp.asarray(mask), key=key, lora=state.lora,
              masks=eval_masks(setup, state), scale=cfg.scale)
    tokens, n_gen = np.asarray(out.tokens), np.asarray(out.lengths)
    full = np.asarray(tok.input_ids)[rows]
    group = setup.test_batches.get("group")
    client = None if group is None else np.asarray(group).reshape(-1)[rows]
    dec = lambda x: tokenizer.decode([int(t) for t in x], skip_special_tokens=True)
    return [{"prompt": dec(ids[g, : plen[g]]), "generated": dec(tokens[g, : n_gen[g]]),
             "reference": dec(full[g, plen[g]: lens[g]]),
             **({} if client is None else {"client": int(client[g])})} for g in range(len(ids))]
