"""Cached generation (models/generate.py): the KV-cache path gives the tokens and logits of
repeated full forward passes, LoRA applied; greedy is deterministic, sampling reproducible by
key, EOS stops each row, and the whole generation is one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import GPT2LM, GPT2Config, LlamaConfig, LlamaLM, make_generate
from fedlora_jax.models.common import split_for_round

ATOL = 1e-5  # float32 logits, cache vs recomputation
V = 61


def tiny(arch):
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=48, max_position_embeddings=48, rope_theta=100.0)
        return LlamaLM(cfg, rngs=nnx.Rngs(0))
    cfg = GPT2Config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                     max_position_embeddings=48)
    return GPT2LM(cfg, rngs=nnx.Rngs(0))


def adapter(model, seed=1):
    targets = model.adapter_targets()
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    tree = lora_lib.init(jax.random.key(seed), shapes, 4, scheme="a_random_b_zero", std=0.3)
    ks = jax.random.split(jax.random.key(seed + 1), len(tree))
    tree = {k: lora_lib.LoraFactors(f.a, 0.3 * jax.random.normal(kk, f.b.shape), f.e)
            for kk, (k, f) in zip(ks, sorted(tree.items()), strict=True)}
    masks = {k: jnp.array([1.0, 1.0, 0.0, 1.0]) for k in tree}
    return tree, masks


PROMPTS = jnp.array([[3, 4, 5, 6, 7, 0], [8, 9, 0, 0, 0, 0], [10, 11, 12, 13, 14, 15]], jnp.int32)
MASK = (jnp.arange(6)[None] < jnp.array([5, 2, 6])[:, None]).astype(jnp.int32)


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.mark.parametrize("arch,with_lora", [("llama", False), ("llama", True), ("gpt2", True)])
def test_cache_equals_recomputation(arch, with_lora):
    model = tiny(arch)
    graphdef, base, head = split_for_round(model)
    lora, masks = adapter(model) if with_lora else (None, None)
    outs = [make_generate(graphdef, max_new_tokens=7, cached=c, return_logits=True)(
        base, head, PROMPTS, MASK, key=None, lora=lora, masks=masks, scale=2.0) for c in (True, False)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, atol=ATOL, rtol=ATOL)
    # and equal to the model's own forward of each row's prompt + generated tokens, alone
    for b in range(PROMPTS.shape[0]):
        n = int(MASK[b].sum())
        seq = jnp.concatenate([PROMPTS[b, :n], outs[0].tokens[b]])[None]
        logits = model(seq, jnp.ones_like(seq), lora=lora, masks=masks, scale=2.0)[0]
        np.testing.assert_allclose(outs[0].logits[b], logits[n - 1: n - 1 + 7], atol=ATOL, rtol=ATOL)
        np.testing.assert_array_equal(outs[0].tokens[b], jnp.argmax(logits[n - 1: n - 1 + 7], -1))


def test_lora_changes_generation(model):
    graphdef, base, head = split_for_round(model)
    gen = make_generate(graphdef, max_new_tokens=5, return_logits=True)
    lora, masks = adapter(model)
    plain = gen(base, head, PROMPTS, MASK, key=None)
    adapted = gen(base, head, PROMPTS, MASK, key=None, lora=lora, masks=masks, scale=2.0)
    assert not np.allclose(plain.logits, adapted.logits, atol=1e-3)


def test_greedy_deterministic_and_sampling_reproducible(model):
    graphdef, base, head = split_for_round(model)
    greedy = make_generate(graphdef, max_new_tokens=6)
    a, b = (greedy(base, head, PROMPTS, MASK, key=jax.random.key(s)).tokens for s in (0, 1))
    np.testing.assert_array_equal(a, b)                       # the key does not matter for greedy
    sample = make_generate(graphdef, max_new_tokens=12, temperature=5.0)
    s0 = sample(base, head, PROMPTS, MASK, key=jax.random.key(0)).tokens
    s0b = sample(base, head, PROMPTS, MASK, key=jax.random.key(0)).tokens
    s1 = sample(base, head, PROMPTS, MASK, key=jax.random.key(1)).tokens
    np.testing.assert_array_equal(s0, s0b)
    assert not np.array_equal(s0, s1)
    ref = make_generate(graphdef, max_new_tokens=12, temperature=5.0, cached=False)
    np.testing.assert_array_equal(ref(base, head, PROMPTS, MASK, key=jax.random.key(0)).tokens, s0)
    with pytest.raises(ValueError, match="key"):
        sample(base, head, PROMPTS, MASK, key=None)


def test_eos_stops_each_row(model):
    graphdef, base, head = split_for_round(model)
    free = make_generate(graphdef, max_new_tokens=6)(base, head, PROMPTS, MASK, key=None).tokens
    eos = int(free[0, 2])                                     # row 0 emits it at step 2 (or earlier)
    out = make_generate(graphdef, max_new_tokens=6, eos_id=eos, pad_id=0)(base, head, PROMPTS, MASK, key=None)
    for b in range(PROMPTS.shape[0]):
        row = np.asarray(free[b])
        hits = np.flatnonzero(row == eos)
        n = int(hits[0]) + 1 if hits.size else 6
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(out.tokens[b, :n], row[:n])
        assert np.all(np.asarray(out.tokens[b, n:]) == 0)
    assert int(out.lengths[0]) <= 3


def test_one_compile_for_any_prompts_and_adapters(model):
    graphdef, base, head = split_for_round(model)
    gen = make_generate(graphdef, max_new_tokens=5, temperature=1.0)
    lora, masks = adapter(model)
    lora2, masks2 = adapter(model, seed=7)
    gen(base, head, PROMPTS, MASK, key=jax.random.key(0), lora=lora, masks=masks, scale=2.0)
    other = (PROMPTS + 1) % V
    gen(base, head, other, jnp.ones_like(MASK), key=jax.random.key(3), lora=lora2, masks=masks2, scale=0.5)
    assert gen.trace_count() == 1


def test_bad_inputs_are_refused(model):
    graphdef, base, head = split_for_round(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_generate(graphdef, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        make_generate(graphdef, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="positions"):
        make_generate(graphdef, max_new_tokens=45)(base, head, PROMPTS, MASK, key=None)
    with pytest.raises(ValueError, match="at least one real token"):
        make_generate(graphdef, max_new_tokens=2)(base, head, PROMPTS, MASK.at[1].set(0), key=None)
