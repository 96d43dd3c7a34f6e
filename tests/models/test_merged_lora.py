"""``Dense``'s folded-kernel LoRA path (the model config's ``merged_lora``) against the low-rank
path: same logits and gradients through a whole encoder, per client under ``vmap``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models._helpers import GOLDENS, load_golden_model

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import from_pretrained
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import Dense, LayerNorm, functional_forward, merged_lora_enabled, split_for_round
from fedlora_jax.models.gpt2 import GPT2LM, GPT2Config
from fedlora_jax.models.llama import LlamaConfig, LlamaLM
from fedlora_jax.models.switches import resolve_switches

MODULES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def _setup(merged_lora: str):
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                        max_position_embeddings=16, num_labels=3, merged_lora=merged_lora)
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


def test_merged_path_equals_low_rank_path_under_vmap():
    grads, args, _ = _setup("on")
    v_on, g_on = grads(*args)
    grads, args, _ = _setup("off")                             # the other path
    v_off, g_off = grads(*args)
    np.testing.assert_allclose(np.asarray(v_on), np.asarray(v_off), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_on["layer.1.ffn_out"].e[0]).max()) > 0          # trained, not trivially 0


def _custom_vjp_calls(mode) -> int:
    _, _, (g, base, head, ids, am, one) = _setup(mode)
    jaxpr = jax.make_jaxpr(lambda lo: functional_forward(g, base, head, ids, am, lora=lo, masks=None,
                                                         scale=0.5))(one)
    return str(jaxpr).count("custom_vjp_call")


def test_switch_selects_the_path():
    n_modules = 2 * len(MODULES)
    assert _custom_vjp_calls("on") - _custom_vjp_calls("off") == n_modules


def _enabled(mode: str, dtype) -> bool:
    """Whether an adapted linear of an encoder configured with ``merged_lora=mode`` takes the
    merged path at compute ``dtype``."""
    cfg = resolve_switches(EncoderConfig(merged_lora=mode))
    return merged_lora_enabled(cfg.merged_lora == "on", dtype)


def test_switch_modes():
    assert _enabled("auto", jnp.float32) == (jax.default_backend() == "cpu")
    assert not _enabled("auto", jnp.bfloat16)
    assert _enabled("on", jnp.float32) and not _enabled("on", jnp.bfloat16)
    with pytest.raises(ValueError, match=r"merged_lora must be one of \('auto', 'on', 'off'\), got 'sometimes'"):
        EncoderConfig(merged_lora="sometimes")


@pytest.mark.parametrize("field", ["merged_lora", "norm_barrier"])
@pytest.mark.parametrize("config_cls", [EncoderConfig, GPT2Config, LlamaConfig])
def test_invalid_switch_value_is_refused(config_cls, field):
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.{field} must be one of \('auto', 'on', 'off'\)"):
        config_cls(**{field: "sometimes"})
    with pytest.raises(ValueError, match=rf"{field} must be one of"):
        config_cls(**{field: True})                       # strings only, no bool shorthand


def _tiny(config_cls, **kw):
    if config_cls is EncoderConfig:
        return EncoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                             max_position_embeddings=16, **kw)
    if config_cls is GPT2Config:
        return GPT2Config(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                          max_position_embeddings=16, **kw)
    return LlamaConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                       intermediate_size=48, max_position_embeddings=16, **kw)


def _adapted(model) -> list[Dense]:
    return [getattr(model.layers[t.layer], t.module) for t in model.adapter_targets().values()]


def _norms(model) -> list[LayerNorm]:
    return [n for _, n in nnx.iter_graph(model) if isinstance(n, LayerNorm)]


@pytest.mark.parametrize("config_cls,model_cls", [(EncoderConfig, EncoderClassifier), (GPT2Config, GPT2LM),
                                                  (LlamaConfig, LlamaLM)])
def test_auto_is_resolved_and_recorded_on_the_built_config(config_cls, model_cls):
    cfg = _tiny(config_cls)
    assert (cfg.norm_barrier, cfg.merged_lora) == ("auto", "auto")          # the config keeps the request
    model = model_cls(cfg, rngs=nnx.Rngs(0))
    want = "on" if jax.default_backend() == "cpu" else "off"
    barrier = want if config_cls is not LlamaConfig else "off"                # RMSNorm: nothing to put it on
    assert (model.config.norm_barrier, model.config.merged_lora) == (barrier, want)
    assert model.config == resolve_switches(cfg) == resolve_switches(model.config)   # resolved once, idempotent
    assert all(d.use_merged_lora is (want == "on") for d in _adapted(model))
    assert all(n.use_barrier is (want == "on") for n in _norms(model))
    # half-precision compute: "auto" keeps the low-rank path and records it as "off"
    bf16 = model_cls(_tiny(config_cls, dtype="bfloat16"), rngs=nnx.Rngs(0)).config
    assert (bf16.norm_barrier, bf16.merged_lora) == (barrier, "off")
    # an explicit "on" that would be ignored is refused
    with pytest.raises(ValueError, match="merged_lora='on' would be ignored"):
        model_cls(_tiny(config_cls, dtype="bfloat16", merged_lora="on"), rngs=nnx.Rngs(0))
    if config_cls is LlamaConfig:
        with pytest.raises(ValueError, match="norm_barrier='on' would be ignored"):
            model_cls(_tiny(config_cls, norm_barrier="on"), rngs=nnx.Rngs(0))
    # explicit choices are kept as given and reach the layers
    off = model_cls(_tiny(config_cls, norm_barrier="off", merged_lora="on"), rngs=nnx.Rngs(0))
    assert (off.config.norm_barrier, off.config.merged_lora) == ("off", "on")
    assert all(not n.use_barrier for n in _norms(off))
    assert all(d.use_merged_lora for d in _adapted(off))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_from_pretrained_takes_the_switches(name):
    want = "on" if jax.default_backend() == "cpu" else "off"
    auto = load_golden_model(name)
    assert (auto.config.norm_barrier, auto.config.merged_lora) == (want if name != "llama" else "off", want)
    chosen = load_golden_model(name, norm_barrier="off", merged_lora="off")
    assert (chosen.config.norm_barrier, chosen.config.merged_lora) == ("off", "off")
    assert not any(d.use_merged_lora for d in _adapted(chosen))
    with pytest.raises(ValueError, match=r"merged_lora must be one of \('auto', 'on', 'off'\), got 'yes'"):
        from_pretrained(GOLDENS / name, key=jax.random.key(0), merged_lora="yes")
