"""Jitted text generation with a KV cache for our decoders (Llama / Qwen2, GPT-2), LoRA applied.

One ``jax.jit`` per generator: prefill of the prompt, then one token per row per step in a
``lax.while_loop`` (it stops early once every row has emitted EOS). Shapes are static: the
cache has ``Tc = T + max_new_tokens`` slots, slot ``p`` holding position ``p``.

Padding (the choice): prompts are **right-padded**, as everywhere else in the library (the
models' positions are ``0..T-1``). Row ``b`` with ``n_b`` real prompt tokens gets its first
new token at slot/position ``n_b``, the next at ``n_b + 1``, ...: each row writes its own
slots, with its own RoPE (or learned-position) offset, over the padding it no longer needs.
So a row's tokens are exactly those of running the model on ``prompt_b + generated_b`` alone,
whatever the other rows' lengths; no left padding and no position ids are needed.

Adapters use the models' call convention (``lora``, ``masks``, ``scale``): the same
``LoraTree`` the round trains, with rank masks, applied in every step.

Example::

    gen = make_generate(graphdef, max_new_tokens=32, eos_id=tok.eos_token_id)
    out = gen(base, head, input_ids, attention_mask, key=jax.random.key(0), lora=lora, scale=2.0)
    out.tokens    # [B, 32] int32, pad_id after each row's EOS
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.lora import LoraTree, MaskTree

Array = jax.Array


class GenerateOutput(NamedTuple):
    """What a generator returns (``N = max_new_tokens``).

    Attributes:
      tokens: ``[B, N]`` int32 generated tokens; ``pad_id`` after a row's EOS (and in steps
        not run because every row had stopped).
      lengths: ``[B]`` int32 tokens generated per row (its EOS included).
      logits: ``[B, N, V]`` float32 logits each token was chosen from (zeros past ``lengths``),
        or ``None`` without ``return_logits``.
    """

    tokens: Array
    lengths: Array
    logits: Array | None


def supports_generation(model: Any) -> bool:
    """True when ``model`` has the cached path (``prefill`` and ``decode_step``)."""
    return callable(getattr(model, "prefill", None)) and callable(getattr(model, "decode_step", None))


def _pick(logits: Array, key, step, temperature: float) -> Array:
    """Greedy (``temperature == 0``) or a sample of ``softmax(logits / temperature)`` with
    ``fold_in(key, step)``; ``[B, V] -> [B]`` int32."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    k = jax.random.fold_in(key, step)
    return jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)


class Generator:
    """A compiled generator: ``gen(base, head, input_ids, attention_mask, *, key, lora=None,
    masks=None, scale=1.0) -> GenerateOutput``.

    ``base``/``head`` are the states of :func:`~fedlora_jax.models.common.split_for_round`
    (or ``nnx.split(model)``'s state and an empty ``nnx.State()``). ``input_ids``,
    ``attention_mask``: ``[B, T]`` right-padded prompts, each row with at least one token.
    ``key``: typed PRNG key (may be ``None`` for greedy decoding). :meth:`trace_count`: how
    many times the function was traced (1 for any number of calls at fixed shapes).
    """

    def __init__(self, graphdef, *, max_new_tokens: int, temperature: float, eos_id: int | None,
                 pad_id: int, cached: bool, return_logits: bool):
        self.graphdef, self.max_new_tokens, self.temperature = graphdef, max_new_tokens, temperature
        self.eos_id, self.pad_id, self.cached, self.return_logits = eos_id, pad_id, cached, return_logits
        self._traces = [0]
        self._jitted = jax.jit(self._impl)

    def trace_count(self) -> int:
        return self._traces[0]

    def __call__(self, base, head, input_ids, attention_mask, *, key, lora: LoraTree | None = None,
                 masks: MaskTree | None = None, scale=1.0) -> GenerateOutput:
        if key is None and self.temperature != 0:
            raise ValueError("temperature sampling needs a PRNG key (key=jax.random.key(seed))")
        if getattr(input_ids, "ndim", None) != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {getattr(input_ids, 'shape', None)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not isinstance(attention_mask, jax.core.Tracer) and int(jnp.min(jnp.sum(attention_mask != 0, -1))) < 1:
            raise ValueError("every prompt row needs at least one real token (attention_mask all zero in a row)")
        if key is None:
            key = jax.random.key(0)
        return self._jitted(base, head, input_ids, attention_mask, key, lora, masks, scale)

    def _impl(self, base, head, input_ids, attention_mask, key, lora, masks, scale):
        self._traces[0] += 1
        model = nnx.merge(self.graphdef, base, head)
        if not supports_generation(model):
            raise TypeError(f"{type(model).__name__} has no cached generation path (prefill/decode_step)")
        b, t = input_ids.shape
        n = self.max_new_tokens
        tc = t + n
        max_len = model.config.max_len
        if tc > max_len:
            raise ValueError(f"prompt length T={t} + max_new_tokens={n} exceeds the model's {max_len} positions")
        rows = jnp.arange(b)
        lens = jnp.sum(attention_mask != 0, axis=-1).astype(jnp.int32)       # [B]
        valid = jnp.pad(attention_mask != 0, ((0, 0), (0, n)))               # [B, Tc]
        ids_buf = jnp.pad(input_ids.astype(jnp.int32), ((0, 0), (0, n)), constant_values=self.pad_id)
        kw = dict(lora=lora, masks=masks, scale=scale)
        if self.cached:
            logits_p, cache = model.prefill(input_ids, attention_mask, cache_len=tc, **kw)
        else:
            logits_p, cache = model(ids_buf, valid.astype(jnp.int32), **kw), ()
        first = logits_p[rows, lens - 1]                                     # [B, V]
        vocab = first.shape[-1]
        out_logits = jnp.zeros((b, n, vocab), jnp.float32) if self.return_logits else None
        carry = (jnp.zeros((), jnp.int32), first, cache, valid, ids_buf,
                 jnp.full((b, n), self.pad_id, jnp.int32), out_logits,
                 jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))

        def cond(c):
            return (c[0] < n) & ~jnp.all(c[7])

        def body(c):
            step, logits, cache, valid, ids_buf, tokens, out_logits, done, lengths = c
            tok = _pick(logits, key, step, self.temperature)
            tok = jnp.where(done, self.pad_id, tok)
            tokens = tokens.at[:, step].set(tok)
            if out_logits is not None:
                out_logits = out_logits.at[:, step].set(jnp.where(done[:, None], 0.0, logits))
            lengths = lengths + (~done).astype(jnp.int32)
            if self.eos_id is not None:
                done = done | (tok == self.eos_id)
            pos = lens + step                                                # [B] slot of tok
            valid = valid.at[rows, pos].set(True)
            ids_buf = ids_buf.at[rows, pos].set(tok)
            if self.cached:
                logits, cache = model.decode_step(tok, pos, cache, valid, **kw)
            else:  # reference: the full forward of the sequence so far, no cache
                logits = model(ids_buf, valid.astype(jnp.int32), **kw)[rows, pos]
            return step + 1, logits, cache, valid, ids_buf, tokens, out_logits, done, lengths

        out = jax.lax.while_loop(cond, body, carry)
        return GenerateOutput(out[5], out[8], out[6])


def make_generate(graphdef, *, max_new_tokens: int, temperature: float = 0.0, eos_id: int | None = None,
                  pad_id: int = 0, cached: bool = True, return_logits: bool = False) -> Generator:
    """Build a jitted generator for a decoder's ``graphdef`` (see :class:`Generator`).

    Args:
      graphdef: from ``split_for_round(model)`` / ``nnx.split(model)`` of a model with
        ``prefill``/``decode_step`` (:class:`~fedlora_jax.models.LlamaLM`,
        :class:`~fedlora_jax.models.GPT2LM`).
      max_new_tokens: ``N`` (static), >= 1.
      temperature: 0 = greedy (deterministic); > 0 samples ``softmax(logits / temperature)``
        with ``fold_in(key, step)`` (reproducible by key).
      eos_id: a row stops after emitting it (``None``: never stops before ``N``).
      pad_id: written after a row stopped.
      cached: ``False`` recomputes the full forward every step (the no-cache reference).
      return_logits: also return the ``[B, N, V]`` logits of every step.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if eos_id is not None and (not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"eos_id must be None or an int >= 0, got {eos_id!r}")
    return Generator(graphdef, max_new_tokens=max_new_tokens, temperature=float(temperature), eos_id=eos_id,
                     pad_id=int(pad_id), cached=bool(cached), return_logits=bool(return_logits))


def generate(model: nnx.Module, input_ids: Array, attention_mask: Array, *, key, max_new_tokens: int,
             lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0, temperature: float = 0.0,
             eos_id: int | None = None, pad_id: int = 0) -> GenerateOutput:
    """Convenience: split ``model`` and run :func:`make_generate` once (compiles per call; build
    the generator yourself to reuse the compilation)."""
    if not supports_generation(model):
        raise TypeError(f"{type(model).__name__} has no cached generation path (prefill/decode_step); "
                        "generation needs a causal LM (LlamaLM, GPT2LM)")
    graphdef, state = nnx.split(model)
    gen = make_generate(graphdef, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                        pad_id=pad_id)
    return gen(state, nnx.State({}), jnp.asarray(input_ids), jnp.asarray(attention_mask), key=key, lora=lora,
               masks=masks, scale=scale)
