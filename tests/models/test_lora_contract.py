"""The model call contract: LoRA threading, masks, grad_cut_layer, round split, merging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models._helpers import inputs, load_golden_model, nonzero_b, random_lora

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import functional_forward, merge_lora_into_base, split_for_round
from fedlora_jax.models.common import Dense

SCALE = 0.5


def test_dense_matches_numpy_reference():
    rngs = nnx.Rngs(0)
    dense = Dense(6, 5, use_bias=True, param_dtype=jnp.float32, rngs=rngs)
    dense.bias[...] = jnp.arange(5.0)
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    f = lora_lib.LoraFactors(jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32),
                             jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32))
    mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    from fedlora_jax.models.common import AdapterCall
    call = AdapterCall({"k": f}, {"k": mask}, SCALE)
    got = dense(jnp.asarray(x), dtype=jnp.float32, key="k", adapter=call)
    w, b = np.asarray(dense.kernel[...]), np.asarray(dense.bias[...])
    ref = x @ w + b + SCALE * ((x @ np.asarray(f.a)) * np.asarray(mask)) @ np.asarray(f.b)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)
    zero = dense(jnp.asarray(x), dtype=jnp.float32, key="k",
                 adapter=AdapterCall({"k": f}, {"k": jnp.zeros(4)}, SCALE))
    np.testing.assert_allclose(np.asarray(zero), x @ w + b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_zero_b_is_identity(name):
    model = load_golden_model(name)
    ids, mask = inputs(name)
    tree, _ = random_lora(model, jax.random.key(1))
    base = np.asarray(model(ids, mask))
    with_lora = np.asarray(model(ids, mask, lora=tree, scale=SCALE))
    np.testing.assert_allclose(with_lora, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["roberta", "qwen2"])
def test_masked_module_equals_no_adapter(name):
    model = load_golden_model(name)
    ids, mask = inputs(name)
    tree, targets = random_lora(model, jax.random.key(2))
    tree = nonzero_b(tree, jax.random.key(3))
    keys = sorted(tree)
    pruned = keys[::2]
    masks = {k: (jnp.zeros(4) if k in pruned else jnp.ones(4)) for k in keys}
    kept = {k: v for k, v in tree.items() if k not in pruned}
    out = model(ids, mask, lora=tree, masks=masks, scale=SCALE)
    ref = model(ids, mask, lora=kept, scale=SCALE)
    base = model(ids, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(ref) - np.asarray(base)).max() > 1e-5   # the adapters do act


def test_lora_forward_equals_merged_base():
    """Independent path: fold delta_w into the kernels (lora.merge) and run without LoRA."""
    model = load_golden_model("llama")
    ids, mask = inputs("llama")
    tree, _ = random_lora(model, jax.random.key(4))
    tree = nonzero_b(tree, jax.random.key(5))
    tree = {k: f._replace(e=jnp.array([1.0, 2.0, 0.5, 3.0])) for k, f in tree.items()}
    masks = {k: jnp.array([1.0, 1.0, 0.0, 1.0]) for k in tree}
    out = model(ids, mask, lora=tree, masks=masks, scale=SCALE)
    merged = merge_lora_into_base(model, tree, masks, scale=SCALE)
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), np.asarray(out), atol=1e-4, rtol=1e-4)
    # The input model is untouched; merging a base State works the same.
    assert np.abs(np.asarray(model(ids, mask)) - np.asarray(out)).max() > 1e-3
    graphdef, base, head = split_for_round(model)
    new_base = merge_lora_into_base(base, tree, masks, scale=SCALE)
    out2 = functional_forward(graphdef, new_base, head, ids, mask, lora=None, masks=None, scale=1.0)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_functional_forward_jit_and_vmap_over_clients(name):
    model = load_golden_model(name)
    ids, mask = inputs(name)
    graphdef, base, head = split_for_round(model)
    if name == "bert":
        assert set(head.to_pure_dict()["head"]) == {"classifier"}
        assert len(jax.tree.leaves(head)) == 2
    else:
        assert len(jax.tree.leaves(head)) == 0
    trees = [nonzero_b(random_lora(model, jax.random.key(10 + c))[0], jax.random.key(20 + c))
             for c in range(2)]
    masks = [{k: jnp.array([1.0, 1.0, 0.0, 0.0]) for k in trees[0]},
             {k: jnp.array([0.0, 0.0, 0.0, 0.0]) if "0." in k else jnp.ones(4) for k in trees[0]}]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)

    @jax.jit
    def run(base, head, lora, m):
        fwd = lambda lo, mm: functional_forward(graphdef, base, head, ids, mask, lora=lo, masks=mm,
                                                scale=SCALE)
        return jax.vmap(fwd)(lora, m)

    got = run(base, head, stack(trees), stack(masks))
    for c in range(2):   # Python-loop reference with the eager model
        ref = model(ids, mask, lora=trees[c], masks=masks[c], scale=SCALE)
        np.testing.assert_allclose(np.asarray(got[c]), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_grad_cut_layer_static_and_dynamic(name):
    model = load_golden_model(name)
    ids, mask = inputs(name)
    n_layers = model.config.num_layers
    graphdef, base, head = split_for_round(model)
    tree, _ = random_lora(model, jax.random.key(6))
    tree = nonzero_b(tree, jax.random.key(7))

    def grads(cut):
        def loss(lo):
            out = functional_forward(graphdef, base, head, ids, mask, lora=lo, masks=None,
                                     scale=SCALE, grad_cut_layer=cut)
            return jnp.mean(jnp.square(out))
        return jax.grad(loss)(tree)

    static = jax.jit(grads, static_argnums=0)
    dyn = jax.jit(grads)
    full = static(None)
    for k in range(n_layers + 1):
        g_static = static(k)
        g_dyn = dyn(jnp.int32(k))
        for key in tree:
            layer = int(key.split(".")[1])
            for part in ("a", "b"):
                gs = np.asarray(getattr(g_static[key], part))
                gd = np.asarray(getattr(g_dyn[key], part))
                np.testing.assert_allclose(gd, gs, atol=1e-6, rtol=1e-5)
                if layer < k:
                    assert not np.any(gs), (key, k)
                else:
                    np.testing.assert_allclose(gs, np.asarray(getattr(full[key], part)),
                                               atol=1e-6, rtol=1e-5)
                    assert np.any(gs), (key, k)


def test_adapter_targets_and_errors():
    model = load_golden_model("llama")
    t = model.adapter_targets(["q_proj", "down_proj"], layers=[1])
    assert set(t) == {"layer.1.q_proj", "layer.1.down_proj"}
    assert (t["layer.1.q_proj"].in_features, t["layer.1.q_proj"].out_features) == (32, 32)
    assert (t["layer.1.down_proj"].in_features, t["layer.1.down_proj"].out_features) == (48, 32)
    assert model.adapter_targets(["k_proj"])["layer.0.k_proj"].out_features == 16   # GQA 2 x 8
    assert t["layer.1.q_proj"].hf_path == "model.layers.1.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"unknown module.*query.*valid modules.*q_proj"):
        model.adapter_targets(["query"])
    with pytest.raises(ValueError, match="out of range"):
        model.adapter_targets(layers=[2])
    ids, mask = inputs("llama")
    tree, _ = random_lora(load_golden_model("gpt2"), jax.random.key(0))
    with pytest.raises(ValueError, match="not adapter targets"):
        model(ids, mask, lora=tree)
    with pytest.raises(ValueError, match="grad_cut_layer=3 out of range"):
        model(ids, mask, grad_cut_layer=3)


@pytest.mark.parametrize("name,limit", [("bert", 32), ("roberta", 32), ("gpt2", 32),
                                        ("llama", 64)])
def test_too_long_sequence_raises(name, limit):
    model = load_golden_model(name)
    ids = jnp.full((1, limit + 1), 5, jnp.int32)
    with pytest.raises(ValueError, match=f"T={limit + 1} exceeds.*{limit}"):
        model(ids, jnp.ones_like(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, jnp.ones((1, 3), jnp.int32))


def test_remat_blocks_give_identical_gradients():
    """jax.checkpoint per transformer block changes memory, not numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fedlora_jax import lora as lora_lib
    from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
    from fedlora_jax.models.common import functional_forward, split_for_round

    cfg = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=100,
                        max_position_embeddings=32)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    g, base, head = split_for_round(model)
    t = model.adapter_targets(["query", "value"])
    lo = lora_lib.init(jax.random.key(1), {k: (v.in_features, v.out_features) for k, v in t.items()}, 4, std=0.1)
    ids = jax.random.randint(jax.random.key(2), (3, 8), 0, 100)
    mask = jnp.ones((3, 8), jnp.int32)

    def loss(lo, remat):
        return jnp.sum(functional_forward(g, base, head, ids, mask, lora=lo, masks=None, scale=1.0, remat=remat) ** 2)

    g0 = jax.jit(jax.grad(lambda lo: loss(lo, False)))(lo)
    g1 = jax.jit(jax.grad(lambda lo: loss(lo, True)))(lo)
    for k in lo:
        np.testing.assert_allclose(np.asarray(g0[k].a), np.asarray(g1[k].a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g0[k].b), np.asarray(g1[k].b), rtol=1e-5, atol=1e-6)
