"""GGUF checkpoints (llama.cpp) -> our Llama model and its tokenizer, in NumPy only (no torch).

A GGUF file holds metadata (``general.architecture``, ``llama.*`` hyperparameters, the tokenizer
vocabulary, merges and chat template) and tensors, each stored as floats (F32/F16/BF16) or as
quantized blocks (Q8_0, Q4_0, ...). Reading and dequantizing go through the ``gguf`` package
(``gguf.GGUFReader``, ``gguf.quants.dequantize``), which is pure Python + NumPy.

Conventions:

* GGUF lists a tensor's dimensions fastest-moving first (a linear layer is ``ne = [N, M]``);
  the reader and :func:`dequantize_tensor` give the NumPy (row-major) array ``[M, N]``, the
  ``transformers`` ``weight`` layout; our kernels are ``weight.T`` ``[N, M]``.
* Tensor names map onto the ``transformers`` Llama names (``GGUF_TO_HF``), e.g.
  ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``, ``token_embd.weight``
  -> ``model.embed_tokens.weight``, ``output.weight`` -> ``lm_head.weight``; a file without
  ``output.weight`` has tied embeddings.
* llama.cpp's converter permutes the rows of the query and key projections (``permute(w,
  n_head, n_head_kv)``: per head, the two rotary halves are interleaved, ``[H, 2, D/2]`` ->
  ``[H, D/2, 2]``). :func:`unpermute_qk` undoes it, so after loading every weight is in the
  Hugging Face layout and LoRA adapters on ``q_proj``/``k_proj`` mean what they mean for the
  ``transformers`` model (``peft_io`` needs no GGUF special case).
* Dequantized weights are float32 NumPy arrays (cast to the model's ``param_dtype`` later).

Refused with a clear error: a file that is not GGUF (bad magic), a truncated or corrupt file
(the message names the file and what is wrong, e.g. tensor data past the end of the file), an
architecture other than ``llama`` (named), a tensor type outside ``SUPPORTED_TYPES`` (the
message names the tensor and its type), unknown or missing tensors, shapes that do not fit the
configuration, RoPE scaling and partial rotary embeddings.

Example::

    cfg = config_from_gguf(read_gguf_metadata(path), gguf_tensor_names(path))
    tensors = load_gguf_tensors(path)          # {"model.layers.0.self_attn.q_proj.weight": [M, N], ...}
    tok = load_gguf_tokenizer(path)            # transformers tokenizer with the chat template

``fedlora_jax.models.from_pretrained(path_to_gguf)`` does all of it and returns a ``LlamaLM``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_jax.models import llama

MAGIC = b"GGUF"
# Tensor types we dequantize (all through gguf.quants.dequantize). The K-quants are the block
# types of llama.cpp's common Q4_K_M / Q5_K_M / Q6_K files.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)

_BLOCK_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
# Buffers some converters write that the model does not use.
_IGNORED = ("rope_freqs.weight",)


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded (corrupt, truncated, unsupported); names the file."""


# ------------------------------------------------------------------ reading the file

_READER: list = []


def _reader_class():
    if _READER:
        return _READER[0]
    import gguf

    class _CheckedReader(gguf.GGUFReader):
        """``GGUFReader`` that checks every tensor's type and byte range before mapping it."""

        def __init__(self, path):
            self._path = str(path)
            super().__init__(path)

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise GGUFError(f"{self._path}: tensor {name!r} has unknown ggml type id {int(raw_dtype[0])} "
                                    "(corrupt file, or a type newer than the installed gguf package)") from None
                block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64)))
                if n % block:
                    raise GGUFError(f"{self._path}: tensor {name!r} ({qtype.name}) has {n} elements, not a "
                                    f"multiple of its block size {block} (corrupt file)")
                start = int(start_offs) + int(offset[0])
                end = start + n // block * nbytes
                if end > size:
                    raise GGUFError(f"{self._path}: tensor {name!r} data [{start}, {end}) lies past the end of "
                                    f"the file ({size} bytes): the file is truncated")
            return super()._build_tensors(start_offs, fields)

    _READER.append(_CheckedReader)
    return _CheckedReader


def open_gguf(path: str | os.PathLike):
    """``gguf.GGUFReader`` over ``path`` (memory-mapped; tensors are read lazily).

    Raises:
      FileNotFoundError: no such file.
      GGUFError: not a GGUF file (bad magic), or a truncated / corrupt header, metadata or
        tensor table, or tensor data past the end of the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} not found")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(24)
    if head[:4] != MAGIC:
        raise GGUFError(f"{p} is not a GGUF file: its first bytes are {head[:4]!r}, expected the magic {MAGIC!r}")
    if size < 24:
        raise GGUFError(f"{p} is truncated: {size} bytes, shorter than the 24-byte GGUF header")
    try:
        return _reader_class()(str(p))
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as err:
        raise GGUFError(f"{p} is a corrupt or truncated GGUF file ({size} bytes): reading its metadata and "
                        f"tensor table failed with {type(err).__name__}: {err}") from err


def _as_reader(path_or_reader):
    import gguf

    return path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else open_gguf(path_or_reader)


def read_gguf_metadata(path_or_reader) -> dict[str, Any]:
    """All metadata as plain Python values (``str``, ``int``, ``float``, ``bool``, lists).

    ``path_or_reader``: a ``.gguf`` path or an :func:`open_gguf` reader. The ``GGUF.*`` header
    counts are included; the tokenizer vocabulary ``tokenizer.ggml.tokens`` is a list of str.
    """
    reader = _as_reader(path_or_reader)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise GGUFError(f"metadata key {key!r} cannot be decoded: {err}") from err
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def gguf_tensor_names(path_or_reader) -> tuple[str, ...]:
    """Names of the tensors in the file, in file order."""
    return tuple(t.name for t in _as_reader(path_or_reader).tensors)


def dequantize_tensor(tensor) -> np.ndarray:
    """One ``gguf`` ``ReaderTensor`` as float32 NumPy in row-major order (``[M, N]`` for a linear).

    Raises:
      GGUFError: a type outside ``SUPPORTED_TYPES`` (naming the tensor and its type).
    """
    from gguf import quants

    qtype = tensor.tensor_type
    if qtype.name not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name!r} is stored as {qtype.name} (ggml type {int(qtype)}), which is "
                        f"not supported; supported types: {', '.join(SUPPORTED_TYPES)}")
    arr = quants.dequantize(np.asarray(tensor.data), qtype)
    return np.asarray(arr, dtype=np.float32)


# ------------------------------------------------------------------ config

def _need(meta: Mapping[str, Any], key: str, path_hint: str):
    if key not in meta:
        raise GGUFError(f"{path_hint}GGUF metadata has no {key!r}, which a Llama config needs")
    value = meta[key]
    if isinstance(value, (list, tuple)):
        raise GGUFError(f"{path_hint}GGUF metadata {key!r} is a per-layer list {list(value)[:4]}...; only one "
                        "value for all layers is supported")
    return value


def check_architecture(meta: Mapping[str, Any], path_hint: str = "") -> str:
    """``general.architecture``; ``GGUFError`` naming it unless it is in ``SUPPORTED_ARCHITECTURES``."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path_hint}GGUF architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}); only Llama-architecture GGUF files load")
    return arch


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Sequence[str] = (), **overrides) -> llama.LlamaConfig:
    """``LlamaConfig`` from GGUF metadata (``llama.*`` keys) and the file's tensor names.

    Reads ``context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
    ``attention.head_count(_kv)``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``
    (default 10000), ``attention.key_length`` / ``rope.dimension_count`` (head dim, default
    ``D / H``), the vocabulary size (``llama.vocab_size``, else the length of
    ``tokenizer.ggml.tokens``); tied embeddings when there is no ``output.weight``; biases when
    ``attn_q.bias`` / ``attn_output.bias`` / ``ffn_gate.bias`` tensors exist. ``overrides``
    go to ``LlamaConfig`` (``dtype``, ``param_dtype``, ``norm_barrier``, ``merged_lora``).

    Raises:
      GGUFError: another architecture, a missing key, RoPE scaling, partial rotary embeddings.
    """
    hint = f"{meta['__path__']}: " if "__path__" in meta else ""
    arch = check_architecture(meta, hint)
    g = lambda k: _need(meta, f"{arch}.{k}", hint)
    d, nh = int(g("embedding_length")), int(g("attention.head_count"))
    nkv = int(meta.get(f"{arch}.attention.head_count_kv", nh))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d // nh))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{hint}attention.value_length {meta[f'{arch}.attention.value_length']} differs from the "
                        f"key length {head_dim}: not supported")
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise GGUFError(f"{hint}rope.dimension_count {rot} != head dim {head_dim}: partial rotary embeddings are "
                        "not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise GGUFError(f"{hint}RoPE scaling {scaling!r} is not supported (only unscaled RoPE)")
    if f"{arch}.vocab_size" in meta:
        vocab = int(meta[f"{arch}.vocab_size"])
    elif "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        raise GGUFError(f"{hint}GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens: the "
                        "vocabulary size is unknown")
    names = set(tensor_names)
    kw: dict[str, Any] = dict(
        model_type="llama", vocab_size=vocab, hidden_size=d, num_layers=int(g("block_count")),
        num_heads=nh, num_kv_heads=nkv, head_dim=head_dim, intermediate_size=int(g("feed_forward_length")),
        max_position_embeddings=int(g("context_length")),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_gate.bias" in names,
        tie_word_embeddings=bool(names) and "output.weight" not in names)
    kw.update(overrides)
    return llama.LlamaConfig(**kw)


# ------------------------------------------------------------------ tensors

def hf_name(gguf_name: str) -> str | None:
    """``"blk.3.attn_q.weight"`` -> ``"model.layers.3.self_attn.q_proj.weight"`` (None if unknown)."""
    m = _BLK_RE.match(gguf_name)
    if m:
        suffix = _BLOCK_HF.get(m.group(2))
        return None if suffix is None else f"model.layers.{m.group(1)}.{suffix}.{m.group(3)}"
    m = _TOP_RE.match(gguf_name)
    if m and m.group(1) in GGUF_TO_HF:
        return f"{GGUF_TO_HF[m.group(1)]}.{m.group(2)}"
    return None


def gguf_name_table(cfg: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{gguf name: expected row-major shape}`` of every tensor a file for ``cfg`` must hold."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        t["output.weight"] = (v, d)
    mats = {"attn_q": (hq, d), "attn_k": (hk, d), "attn_v": (hk, d), "attn_output": (d, hq),
            "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    bias = {"attn_q": cfg.qkv_bias, "attn_k": cfg.qkv_bias, "attn_v": cfg.qkv_bias, "attn_output": cfg.o_bias,
            "ffn_gate": cfg.mlp_bias, "ffn_up": cfg.mlp_bias, "ffn_down": cfg.mlp_bias}
    for i in range(cfg.num_layers):
        for name, shape in mats.items():
            t[f"blk.{i}.{name}.weight"] = shape
            if bias[name]:
                t[f"blk.{i}.{name}.bias"] = shape[:1]
        t[f"blk.{i}.attn_norm.weight"] = (d,)
        t[f"blk.{i}.ffn_norm.weight"] = (d,)
    return t


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF layout -> GGUF layout).

    ``w: [H * D, ...]`` (a weight ``[H*D, N]`` or a bias ``[H*D]``); ``n_head`` is the number of
    query heads for ``attn_q`` and of key/value heads for ``attn_k``. Per head the rows
    ``[2, D/2]`` (the two rotary halves) become ``[D/2, 2]`` (interleaved pairs).
    """
    w = np.asarray(w)
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF layout -> HF layout); same arguments."""
    w = np.asarray(w)
    if w.shape[0] % (2 * n_head):
        raise GGUFError(f"q/k projection with {w.shape[0]} rows cannot be split into {n_head} heads of even size")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_tensors(reader, cfg: llama.LlamaConfig, path_hint: str = "") -> None:
    """Unknown, missing and wrongly shaped tensors, and unsupported types, reported all at once.

    Raises:
      GGUFError: naming the GGUF tensors (and their types) that are wrong.
    """
    expected = gguf_name_table(cfg)
    present = {t.name: t for t in reader.tensors}
    unknown = sorted(n for n in present if n not in expected and n not in _IGNORED)
    missing = sorted(n for n in expected if n not in present)
    bad_type = sorted(f"{n} ({t.tensor_type.name})" for n, t in present.items()
                      if n in expected and t.tensor_type.name not in SUPPORTED_TYPES)
    bad_shape = sorted(f"{n}: file {tuple(int(x) for x in reversed(t.shape))} vs config {expected[n]}"
                       for n, t in present.items()
                       if n in expected and tuple(int(x) for x in reversed(t.shape)) != expected[n])
    problems = []
    if bad_type:
        problems.append(f"unsupported tensor types ({len(bad_type)}): {bad_type[:6]} (supported: "
                        f"{', '.join(SUPPORTED_TYPES)})")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:10]}")
    if unknown:
        problems.append(f"unexpected tensors ({len(unknown)}): {unknown[:10]}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): {bad_shape[:10]}")
    if problems:
        raise GGUFError(f"{path_hint}GGUF tensors do not fit the Llama config from its metadata "
                        f"(layers={cfg.num_layers}, hidden={cfg.hidden_size}, heads={cfg.num_heads}/"
                        f"{cfg.num_kv_heads}, vocab={cfg.vocab_size}): " + "; ".join(problems))


def load_gguf_tensors(path_or_reader, cfg: llama.LlamaConfig | None = None) -> dict[str, np.ndarray]:
    """Every model tensor as float32 NumPy under its ``transformers`` name, q/k un-permuted.

    Args:
      path_or_reader: a ``.gguf`` path or an :func:`open_gguf` reader.
      cfg: the config (default: :func:`config_from_gguf` of the file); gives the head counts
        for :func:`unpermute_qk` and the expected shapes.

    Returns:
      ``{"model.embed_tokens.weight": [V, D], "model.layers.{i}.self_attn.q_proj.weight":
      [H*Dh, D], ..., "lm_head.weight": [V, D] (untied only)}``, each a ``transformers``
      ``weight`` (``[out, in]``).

    Raises:
      GGUFError: see :func:`check_tensors` and :func:`config_from_gguf`.
    """
    reader = _as_reader(path_or_reader)
    hint = f"{getattr(reader, '_path', '')}: " if getattr(reader, "_path", "") else ""
    if cfg is None:
        meta = read_gguf_metadata(reader)
        cfg = config_from_gguf({**meta, "__path__": hint[:-2]} if hint else meta, gguf_tensor_names(reader))
    check_tensors(reader, cfg, hint)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        w = dequantize_tensor(t)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, cfg.num_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, cfg.num_kv_heads)
        out[hf_name(t.name)] = w
    return out


def load_gguf(path: str | os.PathLike, **overrides) -> tuple[llama.LlamaConfig, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a GGUF file: :func:`config_from_gguf` and :func:`load_gguf_tensors`.

    ``overrides`` go to the config (``dtype``, ``param_dtype``, ``norm_barrier``, ``merged_lora``).
    """
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    meta["__path__"] = str(path)
    cfg = config_from_gguf(meta, gguf_tensor_names(reader), **overrides)
    return cfg, load_gguf_tensors(reader, cfg)


# ------------------------------------------------------------------ tokenizer

# GGUF tokenizer metadata -> the tokenizer dict transformers' GGUF converter takes
# (the table of transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_TOKENIZER_MAPPING).
_TOKENIZER_KEYS = {"ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
                   "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
                   "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
                   "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
                   "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space"}
_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                          "ggml.add_eos_token": "add_eos_token"}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def gguf_tokenizer_dicts(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer_config)`` from GGUF metadata, as ``transformers`` builds them.

    ``tokenizer_config`` holds ``chat_template``, ``add_bos_token`` / ``add_eos_token`` and the
    special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) as strings.
    """
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError("GGUF metadata has no tokenizer (no tokenizer.ggml.tokens)")
    tok = {name: meta[f"tokenizer.{k}"] for k, name in _TOKENIZER_KEYS.items() if f"tokenizer.{k}" in meta}
    cfg = {name: meta[f"tokenizer.{k}"] for k, name in _TOKENIZER_CONFIG_KEYS.items() if f"tokenizer.{k}" in meta}
    if tok.get("tokenizer_type") == "llama":   # sentencepiece files add BOS unless they say otherwise
        cfg.setdefault("add_bos_token", True)
    tokens = tok["tokens"]
    for name, key in _SPECIAL.items():
        idx = meta.get(f"tokenizer.ggml.{key}")
        cfg[name] = tokens[int(idx)] if idx is not None else None
    return tok, cfg


def load_gguf_tokenizer(path: str | os.PathLike):
    """The Hugging Face fast tokenizer described by a GGUF file's metadata, without torch.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` needs torch (its GGUF reader imports
    it); this reads the metadata with ``gguf`` and uses transformers' GGUF tokenizer converter
    (``transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer``), then wraps
    it as ``transformers``' ``TokenizersBackend`` with the chat template and special tokens. If
    that private converter is unavailable and torch is installed, falls back to
    ``AutoTokenizer``.

    Returns:
      A ``transformers`` tokenizer (``tokenizer.chat_template`` set when the file has one).
    """
    p = Path(path)
    meta = read_gguf_metadata(open_gguf(p))
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError as err:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ImportError("building a tokenizer from GGUF metadata needs transformers' GGUF tokenizer converter "
                              f"(transformers.integrations.gguf), which failed to import: {err}") from err
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    tok_dict, tok_cfg = gguf_tokenizer_dicts(meta)
    fast, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    tok_cfg.update(extra)
    tokenizer = TokenizersBackend(tokenizer_object=fast, name_or_path=str(p.parent), **tok_cfg)
    return tokenizer
