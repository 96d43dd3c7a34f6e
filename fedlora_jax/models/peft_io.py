"""PEFT LoRA adapters <-> our ``LoraTree`` (safetensors only, never unpickled).

Orientation: ``lora_A.weight = a.T`` (``[R, N]``), ``lora_B.weight = b.T`` (``[M, R]``).
Scale: our one ``scale`` at static ``r_max = R`` is PEFT's ``lora_alpha / r`` with ``r = R``
and ``lora_alpha = scale * R``. Masked slots are written as zeros and a gain ``e`` is folded
into ``b`` (``b <- diag(mask * e) b``), so the exported adapter computes the same
``delta_w = scale * a diag(mask * e) b``. Module keys ``"layer.{i}.{module}"`` become the
module paths of the matching ``transformers`` class (``TargetInfo.hf_path``), e.g.
``bert.encoder.layer.3.attention.self.query``, ``transformer.h.0.attn.c_attn``,
``model.layers.1.self_attn.q_proj``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree, effective_gain
from fedlora_jax.models.common import TargetInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS")
_GPT2_MODULES = ("c_attn", "attn_proj", "mlp_fc", "mlp_proj")

# HF module path (architecture prefix removed) -> our module name; group 1 is the layer.
_REVERSE = (
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.query$"), "query"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.key$"), "key"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.value$"), "value"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense$"), "attn_out"),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense$"), "ffn_in"),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense$"), "ffn_out"),
    (re.compile(r"^h\.(\d+)\.attn\.c_attn$"), "c_attn"),
    (re.compile(r"^h\.(\d+)\.attn\.c_proj$"), "attn_proj"),
    (re.compile(r"^h\.(\d+)\.mlp\.c_fc$"), "mlp_fc"),
    (re.compile(r"^h\.(\d+)\.mlp\.c_proj$"), "mlp_proj"),
) + tuple((re.compile(rf"^layers\.(\d+)\.self_attn\.{m}$"), m)
          for m in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
    (re.compile(rf"^layers\.(\d+)\.mlp\.{m}$"), m) for m in ("gate_proj", "up_proj", "down_proj"))
_ARCH_PREFIXES = ("bert.", "roberta.", "transformer.", "model.")
_TENSOR_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def our_key(hf_path: str) -> str | None:
    """``"bert.encoder.layer.3.attention.self.query"`` -> ``"layer.3.query"`` (None if unknown)."""
    candidates = [hf_path] + [hf_path[len(p):] for p in _ARCH_PREFIXES if hf_path.startswith(p)]
    for cand in candidates:
        for pattern, module in _REVERSE:
            m = pattern.match(cand)
            if m:
                return f"layer.{int(m.group(1))}.{module}"
    return None


def _hf_path(info: TargetInfo, task_type: str) -> str:
    path = info.hf_path
    if not path:
        raise ValueError(f"target layer.{info.layer}.{info.module} has no hf_path; pass targets "
                         "from model.adapter_targets()")
    if task_type == "FEATURE_EXTRACTION":   # the bare BertModel / RobertaModel has no prefix
        for p in ("bert.", "roberta."):
            if path.startswith(p):
                return path[len(p):]
    return path


def export_peft(lora: LoraTree, masks: MaskTree | None, *, scale: float,
                targets: Mapping[str, TargetInfo], out_dir: str | os.PathLike,
                base_model_name_or_path: str, task_type: str, head=None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft`` loads.

    Args:
      lora: one client's adapters ``{key: LoraFactors(a [N, R], b [R, M], e)}``.
      masks: ``{key: [R]}`` rank masks or ``None`` (all slots).
      scale: our LoRA scale; written as ``r = R``, ``lora_alpha = scale * R``.
      targets: ``model.adapter_targets()`` (gives shapes and HF module paths).
      out_dir: created if needed; files are written to temp names then ``os.replace``-d.
      base_model_name_or_path: recorded in the config for ``peft``.
      task_type: PEFT task type, e.g. ``"SEQ_CLS"`` (encoders) or ``"CAUSAL_LM"``;
        ``"FEATURE_EXTRACTION"`` writes paths of the bare encoder (no ``bert.`` prefix).
      head: the encoder's head state (``split_for_round(model)[2]``, or a pure dict
        ``{"classifier": {"kernel": [D, K], "bias": [K]}}``, optionally under ``"head"``);
        required for ``"SEQ_CLS"``, where ``peft`` expects the trained ``classifier`` as a
        ``modules_to_save`` tensor. It reproduces our logits in ``BertForSequenceClassification`` only for
        ``pooling="pooler"`` (HF pools with the pooler).

    Returns:
      The output directory.
    """
    from safetensors.numpy import save

    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if not lora:
        raise ValueError("lora is empty: nothing to export")
    ranks = {int(f.a.shape[-1]) for f in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules must share r_max; got ranks {sorted(ranks)}")
    r_max = ranks.pop()
    tensors: dict[str, np.ndarray] = {}
    paths = []
    for key in sorted(lora):
        f = lora[key]
        if key not in targets:
            raise ValueError(f"lora key {key!r} is not in targets (known: {sorted(targets)[:4]}...)")
        info = targets[key]
        if f.a.ndim != 2 or f.b.ndim != 2:
            raise ValueError(f"lora[{key!r}] is stacked ({f.a.shape}); export one client at a time")
        if f.a.shape != (info.in_features, r_max) or f.b.shape != (r_max, info.out_features):
            raise ValueError(f"lora[{key!r}] a {f.a.shape} b {f.b.shape} do not fit target "
                             f"[{info.in_features}, {info.out_features}] at r_max {r_max}")
        mask = None if masks is None else masks.get(key)
        a = np.asarray(f.a, np.float32)
        b = np.asarray(f.b, np.float32)
        if mask is not None:
            a = a * np.asarray(mask, np.float32)[None, :]
        gain = effective_gain(f, mask)
        if gain is not None:
            b = b * np.asarray(gain, np.float32)[:, None]
        path = _hf_path(info, task_type)
        paths.append(path)
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
    modules_to_save = None
    if task_type == "SEQ_CLS":
        if head is None:
            raise ValueError("task_type='SEQ_CLS' needs head= (the trained classifier): peft "
                             "loads it as modules_to_save")
        pure = head.to_pure_dict() if hasattr(head, "to_pure_dict") else head
        if "classifier" not in pure and "head" in pure:
            pure = pure["head"]
        if "classifier" not in pure:
            raise ValueError(f"head must hold 'classifier', got keys {sorted(pure)}")
        cls = pure["classifier"]
        tensors["base_model.model.classifier.weight"] = np.ascontiguousarray(
            np.asarray(cls["kernel"], np.float32).T)
        tensors["base_model.model.classifier.bias"] = np.asarray(cls["bias"], np.float32)
        modules_to_save = ["classifier"]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_max,
        "lora_alpha": float(scale) * r_max,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": any(targets[k].module in _GPT2_MODULES for k in lora),
        "target_modules": "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(config, indent=2).encode())
    return out


def _pattern_value(pattern: Mapping[str, float], hf_path: str, default):
    for pat, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", hf_path):
            return value
    return default


def import_peft(adapter_dir: str | os.PathLike, *, r_max: int | None = None,
                targets: Mapping[str, TargetInfo] | None = None
                ) -> tuple[LoraTree, MaskTree, float]:
    """Read a PEFT LoRA adapter into ``(lora, masks, scale)`` at a static ``r_max``.

    ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Modules whose own rank/alpha
    (``rank_pattern``/``alpha_pattern``) give another PEFT scale have the ratio folded into
    ``b``. Slots beyond a module's rank are zero-padded with mask 0; a slot whose ``a``
    column and ``b`` row are both exactly zero gets mask 0 (so export -> import round-trips
    masks that follow the zero invariant).

    Args:
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      r_max: static rank to pad to (default: the largest rank in the file).
      targets: optional ``model.adapter_targets()``: every adapter must be one of them with
        matching ``[N, M]``.

    Raises:
      FileNotFoundError: missing files (``adapter_model.bin`` is refused: never unpickled).
      ValueError: not LoRA, DoRA, unknown target module, inconsistent shapes, rank > r_max.
    """
    from safetensors.numpy import load_file

    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"missing {cfg_path}")
    if not w_path.is_file():
        extra = " (adapter_model.bin is not read: convert it to safetensors)" if (
            d / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"missing {w_path}{extra}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not 'LORA'")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not supported")
    r_cfg, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rs = bool(cfg.get("use_rslora", False))
    peft_scale = lambda a_, r_: a_ / (math.sqrt(r_) if rs else r_)
    scale = peft_scale(alpha, r_cfg)
    raw = load_file(str(w_path))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    paths: dict[str, str] = {}
    for name, arr in raw.items():
        m = _TENSOR_RE.match(name)
        if m is None:
            if ".lora_" in name or not cfg.get("modules_to_save"):
                raise ValueError(f"{w_path}: unexpected tensor {name!r}")
            continue   # a modules_to_save copy (e.g. a classifier); not a LoRA factor
        key = our_key(m.group(1))
        if key is None:
            raise ValueError(f"{w_path}: unknown target module {m.group(1)!r}; supported are the "
                             "BERT/RoBERTa, GPT-2 and Llama/Qwen2 modules")
        pairs.setdefault(key, {})[m.group(2)] = np.asarray(arr, np.float32)
        paths[key] = m.group(1)
    if not pairs:
        raise ValueError(f"{w_path}: no LoRA tensors found")
    ranks = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_path}: module {paths[key]!r} lacks lora_{'AB'[('A' in ab)]}")
        a_t, b_t = ab["A"], ab["B"]
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != b_t.shape[1]:
            raise ValueError(f"{w_path}: module {paths[key]!r}: lora_A {a_t.shape} and lora_B "
                             f"{b_t.shape} do not match (expected [r, in] and [out, r])")
        ranks[key] = a_t.shape[0]
        if targets is not None:
            if key not in targets:
                raise ValueError(f"adapter module {paths[key]!r} ({key}) is not a target of the "
                                 f"model (known: {sorted(targets)[:4]}...)")
            t = targets[key]
            if (a_t.shape[1], b_t.shape[0]) != (t.in_features, t.out_features):
                raise ValueError(f"module {key}: adapter is [{a_t.shape[1]}, {b_t.shape[0]}], "
                                 f"model kernel is [{t.in_features}, {t.out_features}]")
    big_r = max(ranks.values()) if r_max is None else int(r_max)
    too_big = {k: r for k, r in ranks.items() if r > big_r}
    if too_big:
        raise ValueError(f"adapter ranks exceed r_max={big_r}: {dict(sorted(too_big.items()))}")
    lora: LoraTree = {}
    masks: MaskTree = {}
    for key in sorted(pairs):
        a_t, b_t, r = pairs[key]["A"], pairs[key]["B"], ranks[key]
        r_m = _pattern_value(cfg.get("rank_pattern"), paths[key], r_cfg)
        alpha_m = _pattern_value(cfg.get("alpha_pattern"), paths[key], alpha)
        ratio = peft_scale(float(alpha_m), int(r_m)) / scale
        a = np.zeros((a_t.shape[1], big_r), np.float32)
        b = np.zeros((big_r, b_t.shape[0]), np.float32)
        a[:, :r] = a_t.T
        b[:r] = b_t.T * ratio
        live = np.zeros((big_r,), np.float32)
        live[:r] = 1.0
        live *= (np.any(a != 0, axis=0) | np.any(b != 0, axis=1)).astype(np.float32)
        lora[key] = LoraFactors(jnp.asarray(a), jnp.asarray(b), None)
        masks[key] = jnp.asarray(live)
    return lora, masks, scale
