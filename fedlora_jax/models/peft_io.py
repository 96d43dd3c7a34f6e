"""PEFT LoRA adapters <-> our ``LoraTree`` (safetensors only, never unpickled).

Orientation: ``lora_A.weight = a.T`` (``[R, N]``), ``lora_B.weight = b.T`` (``[M, R]``).
Scale: our one ``scale`` at static ``r_max = R`` is PEFT's ``lora_alpha / r`` with ``r = R``
and ``lora_alpha = scale * R``. Masked slots are written as zeros and a gain ``e`` is folded
into ``b`` (``b <- diag(mask * e) b``), so the exported adapter computes the same
``delta_w = scale * a diag(mask * e) b``. Module keys ``"layer.{i}.{module}"`` become the
module paths of the matching ``transformers`` class (``TargetInfo.hf_path``), e.g.
``bert.encoder.layer.3.attention.self.query``, ``transformer.h.0.attn.c_attn``,
``model.layers.1.self_attn.q_proj``; the encoder pooler (``pooling="pooler"``) is the key
``"layer.{L}.pooler"`` <-> ``bert.pooler.dense`` (``EncoderClassifier.pooler_targets``).

PEFT ``target_modules`` names (``PEFT_TARGET_NAMES``; :func:`peft_targets` maps them to our
targets with PEFT's matching rule):

* BERT/RoBERTa: ``query``, ``key``, ``value``, ``dense`` (attention output, intermediate,
  output and the pooler), ``all-linear``;
* GPT-2: ``c_attn``, ``c_proj`` (attention and MLP), ``c_fc``, ``all-linear``;
* Llama/Qwen2: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
  ``down_proj``, ``all-linear``.

The SEQ_CLS classifier (``modules_to_save=["classifier"]``) is written from our head by
:func:`export_peft` (``head=``) and read into it by :func:`import_peft_head`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree, effective_gain
from fedlora_jax.models.common import TargetInfo
from fedlora_jax.models.family import families

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS")
POOLER = "pooler"
ALL_LINEAR = "all-linear"
# The per-family tables come from the families' records (fedlora_jax.models.family).
PEFT_TARGET_NAMES = {fam.name: (*fam.peft_target_names, ALL_LINEAR) for fam in families()}
SUPPORTED_TEXT = "; ".join(f"{fam}: {', '.join(names)}" for fam, names in PEFT_TARGET_NAMES.items()) + (
    " (BERT/RoBERTa 'dense' = attention output, intermediate, output and pooler dense)")
# Our modules stored [in, out] in the HF checkpoint (GPT-2's Conv1D): PEFT's fan_in_fan_out.
_FAN_IN_FAN_OUT = frozenset(m for fam in families() for m in fam.fan_in_fan_out)
# HF module path (architecture prefix removed) -> our module name; group 1 is the layer.
_REVERSE = tuple((re.compile(f"^{pattern}$"), module) for fam in families() for pattern, module in fam.peft_modules)
_ARCH_PREFIXES = ("bert.", "roberta.", "transformer.", "model.")
_TENSOR_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
# A modules_to_save copy: ``base_model.model.<module>[.modules_to_save.<adapter>].<weight|bias>``.
_SAVED_RE = re.compile(r"^base_model\.model\.(.+?)(?:\.modules_to_save\.[A-Za-z0-9_]+)?\.(weight|bias)$")


def _parse(hf_path: str) -> tuple[int | None, str] | None:
    """``(layer, our module)`` of an HF module path (layer ``None`` for the pooler), or None."""
    candidates = [hf_path] + [hf_path[len(p):] for p in _ARCH_PREFIXES if hf_path.startswith(p)]
    for cand in candidates:
        for pattern, module in _REVERSE:
            m = pattern.match(cand)
            if m:
                return (int(m.group(1)) if m.groups() else None), module
    return None


def _strip_arch(hf_path: str) -> str:
    for p in _ARCH_PREFIXES:
        if hf_path.startswith(p):
            return hf_path[len(p):]
    return hf_path


def our_key(hf_path: str, *, num_layers: int | None = None) -> str | None:
    """``"bert.encoder.layer.3.attention.self.query"`` -> ``"layer.3.query"`` (None if unknown).

    ``"bert.pooler.dense"`` -> ``"layer.{num_layers}.pooler"``; it needs ``num_layers``
    (``ValueError`` without it)."""
    parsed = _parse(hf_path)
    if parsed is None:
        return None
    layer, module = parsed
    if layer is None:
        if num_layers is None:
            raise ValueError(f"{hf_path!r} is the encoder pooler: its key 'layer.{{L}}.pooler' needs num_layers=L")
        layer = int(num_layers)
    return f"layer.{layer}.{module}"


def model_targets(model) -> dict[str, TargetInfo]:
    """Every adapter target of ``model`` PEFT can name: ``model.adapter_targets()`` plus, for an
    encoder with ``pooling="pooler"``, ``model.pooler_targets()`` (key ``"layer.{L}.pooler"``)."""
    targets = dict(model.adapter_targets())
    if getattr(getattr(model, "config", None), "pooling", None) == "pooler":
        targets.update(model.pooler_targets())
    return targets


def _no_pooler_hint(model) -> str:
    pooling = getattr(getattr(model, "config", None), "pooling", None)
    return (f"the model pools with {pooling!r}, so its pooler is not used: load it with "
            "from_pretrained(..., pooling='pooler')")


def _peft_match(name: str, hf_path: str) -> bool:
    """PEFT's rule for a list entry: the module path equals ``name`` or ends with ``"." + name``."""
    return hf_path == name or hf_path.endswith("." + name)


def peft_targets(model, target_modules: str | Iterable[str]) -> dict[str, TargetInfo]:
    """Our adapter targets for a PEFT ``LoraConfig(target_modules=...)``, matched as PEFT does.

    Args:
      model: one of our models (an encoder loaded with ``pooling="pooler"`` also offers the
        pooler, key ``"layer.{L}.pooler"``).
      target_modules: ``"all-linear"`` (every adaptable linear; PEFT also leaves out the
        classifier / LM head, which are not targets here); another string: a regular
        expression that must match the whole HF module path (PEFT's rule); or a list of names,
        each matching modules whose path equals it or ends with ``"." + name`` (``"dense"``,
        ``"c_proj"``, ``"attention.self.query"``, ...; ``"all-linear"`` in a list means all).
        Supported names: ``PEFT_TARGET_NAMES``.

    Returns:
      ``{key: TargetInfo}`` in the model's target order (pass to :func:`export_peft` or
      ``lora.init`` shapes).

    Raises:
      ValueError: a name or pattern that matches no target of this model (the message lists the
        names this model supports); the pooler of a model that does not pool with it.
    """
    cands = model_targets(model)
    paths = {k: t.hf_path for k, t in cands.items()}
    names = sorted({p.rsplit(".", 1)[-1] for p in paths.values()}) + [ALL_LINEAR]
    pooler_path = None
    if getattr(getattr(model, "config", None), "pooling", POOLER) != POOLER:
        pooler_path = ("roberta." if model.config.model_type == "roberta" else "bert.") + "pooler.dense"
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return cands
        chosen = {k for k, p in paths.items() if re.fullmatch(target_modules, p)}
        if not chosen:
            hint = (f"; {_no_pooler_hint(model)}" if pooler_path and re.fullmatch(target_modules, pooler_path)
                    else "")
            raise ValueError(f"target_modules pattern {target_modules!r} matches no adapter target of this model "
                             f"(a string is a regular expression over the whole module path, e.g. "
                             f"{next(iter(paths.values()))!r}; pass a list for names); supported names: "
                             f"{names}{hint}")
        return {k: t for k, t in cands.items() if k in chosen}
    wanted = list(target_modules)
    if not wanted:
        raise ValueError(f"target_modules is empty; supported names for this model: {names}")
    chosen = set()
    for name in wanted:
        if not isinstance(name, str):
            raise TypeError(f"target_modules entries must be strings, got {name!r}")
        if name.lower() == ALL_LINEAR:
            chosen |= set(cands)
            continue
        hit = {k for k, p in paths.items() if _peft_match(name, p)}
        if not hit:
            if pooler_path and _peft_match(name, pooler_path):
                raise ValueError(f"target module {name!r} names the encoder pooler: {_no_pooler_hint(model)}")
            raise ValueError(f"target module {name!r} is not supported for this model; supported names: {names} "
                             f"(all families: {SUPPORTED_TEXT})")
        chosen |= hit
    return {k: t for k, t in cands.items() if k in chosen}


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
      targets: ``model.adapter_targets()``, :func:`model_targets` or :func:`peft_targets`
        (gives shapes and HF module paths; the pooler key ``"layer.{L}.pooler"`` is written as
        ``bert.pooler.dense``).
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
        "fan_in_fan_out": any(targets[k].module in _FAN_IN_FAN_OUT for k in lora),
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


def _read_adapter(adapter_dir) -> tuple[dict, dict[str, np.ndarray], Path, Path]:
    """``(config, tensors, config path, weights path)`` of an adapter directory (safetensors only)."""
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
    return cfg, load_file(str(w_path)), cfg_path, w_path


def import_peft(adapter_dir: str | os.PathLike, *, r_max: int | None = None,
                targets: Mapping[str, TargetInfo] | None = None, model=None
                ) -> tuple[LoraTree, MaskTree, float]:
    """Read a PEFT LoRA adapter into ``(lora, masks, scale)`` at a static ``r_max``.

    ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Modules whose own rank/alpha
    (``rank_pattern``/``alpha_pattern``) give another PEFT scale have the ratio folded into
    ``b``. Slots beyond a module's rank are zero-padded with mask 0; a slot whose ``a``
    column and ``b`` row are both exactly zero gets mask 0 (so export -> import round-trips
    masks that follow the zero invariant). ``modules_to_save`` copies (the SEQ_CLS classifier)
    are not LoRA factors: read the classifier with :func:`import_peft_head`.

    Args:
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      r_max: static rank to pad to (default: the largest rank in the file).
      targets: optional ``model.adapter_targets()`` / :func:`model_targets` /
        :func:`peft_targets`: every adapter must be one of them with matching ``[N, M]``.
      model: instead of ``targets``: the model the adapter is for (its :func:`model_targets`,
        with the pooler when it pools with ``pooling="pooler"``). An adapter on the encoder
        pooler (``bert.pooler.dense``, e.g. from ``target_modules=["query", "value", "dense"]``)
        needs ``model`` or ``targets`` holding the pooler (key ``"layer.{L}.pooler"``).

    Raises:
      FileNotFoundError: missing files (``adapter_model.bin`` is refused: never unpickled).
      ValueError: not LoRA, DoRA, unknown target module (the message lists the supported
        ones), a pooler adapter for a model not loaded with ``pooling="pooler"``, inconsistent
        shapes, rank > r_max.
    """
    if model is not None:
        if targets is not None:
            raise ValueError("pass targets= or model=, not both")
        targets = model_targets(model)
    cfg, raw, cfg_path, w_path = _read_adapter(adapter_dir)
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not supported")
    r_cfg, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rs = bool(cfg.get("use_rslora", False))
    peft_scale = lambda a_, r_: a_ / (math.sqrt(r_) if rs else r_)
    scale = peft_scale(alpha, r_cfg)
    by_path = {} if targets is None else {_strip_arch(t.hf_path): k for k, t in targets.items() if t.hf_path}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    paths: dict[str, str] = {}
    # LoRA factors first, so an unsupported target module is what gets reported.
    for name in sorted(raw, key=lambda n: _TENSOR_RE.match(n) is None):
        arr = raw[name]
        m = _TENSOR_RE.match(name)
        if m is None:
            if ".lora_" in name:
                raise ValueError(f"{w_path}: unexpected tensor {name!r}: only lora_A / lora_B of linear modules "
                                 f"are read (supported target modules: {SUPPORTED_TEXT})")
            if not cfg.get("modules_to_save"):
                raise ValueError(f"{w_path}: unexpected tensor {name!r} (not a LoRA factor, and the config has "
                                 "no modules_to_save)")
            continue   # a modules_to_save copy (e.g. a classifier); see import_peft_head
        hf_path = m.group(1)
        parsed = _parse(hf_path)
        if parsed is None:
            raise ValueError(f"{w_path}: unknown target module {hf_path!r}; supported target modules are "
                             f"{SUPPORTED_TEXT}")
        if parsed[0] is None:   # the encoder pooler: its key comes from the model
            key = by_path.get(_strip_arch(hf_path))
            if key is None:
                if model is not None:
                    why = _no_pooler_hint(model)
                elif targets is not None:
                    why = ("targets hold no pooler: pass model= (loaded with pooling='pooler') or add "
                           "model.pooler_targets()")
                else:
                    why = "pass model= (loaded with from_pretrained(..., pooling='pooler')) or targets= with the pooler"
                raise ValueError(f"{w_path}: module {hf_path!r} adapts the encoder pooler; {why}")
        else:
            key = f"layer.{parsed[0]}.{parsed[1]}"
        pairs.setdefault(key, {})[m.group(2)] = np.asarray(arr, np.float32)
        paths[key] = hf_path
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


def import_peft_head(adapter_dir: str | os.PathLike, head=None):
    """The SEQ_CLS classifier a PEFT adapter saved (``modules_to_save=["classifier"]``) as our head.

    PEFT stores ``classifier.weight [K, D]`` and ``classifier.bias [K]``; ours is
    ``classifier.kernel [D, K]`` (``kernel = weight.T``) and ``bias [K]``.

    Args:
      adapter_dir: the adapter directory.
      head: ``None``, or the head to load into: the head module itself (``model.head``, updated
        in place), the encoder's head state (``split_for_round(model)[2]``) or a pure dict
        ``{"classifier": {...}}`` (optionally under ``"head"``); states and dicts are not modified.
        Its ``[D, K]`` must match and its dtypes are kept.

    Returns:
      ``head=None``: ``{"classifier": {"kernel": [D, K], "bias": [K]}}`` (float32). A module: the
      same module, its classifier replaced. Otherwise a new object of ``head``'s kind with the
      classifier replaced (an ``nnx.State`` for ``functional_forward`` /
      ``nnx.merge(graphdef, base_state, head_state)``).

    Raises:
      ValueError: no saved classifier; other ``modules_to_save`` tensors (our head is one linear
        layer: e.g. RoBERTa's ``classifier.dense`` / ``classifier.out_proj`` or ``score`` are
        refused); shapes that do not fit ``head``.
    """
    from flax import nnx

    cfg, raw, _, w_path = _read_adapter(adapter_dir)
    saved: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in raw.items():
        if _TENSOR_RE.match(name):
            continue
        m = _SAVED_RE.match(name)
        if m is None:
            raise ValueError(f"{w_path}: unexpected tensor {name!r}")
        saved.setdefault(m.group(1), {})[m.group(2)] = np.asarray(arr, np.float32)
    other = sorted(set(saved) - {"classifier"})
    if other:
        raise ValueError(f"{w_path}: modules_to_save module(s) {other} are not supported: our head is one linear "
                         "'classifier' [D, num_labels] (saved as classifier.weight / classifier.bias)")
    if "classifier" not in saved:
        raise ValueError(f"{w_path}: the adapter holds no saved 'classifier' (modules_to_save="
                         f"{cfg.get('modules_to_save')!r}); save it with task_type='SEQ_CLS' or "
                         "modules_to_save=['classifier']")
    cls = saved["classifier"]
    if set(cls) != {"weight", "bias"}:
        raise ValueError(f"{w_path}: the saved classifier has {sorted(cls)}, expected weight and bias")
    w, bias = cls["weight"], cls["bias"]
    if w.ndim != 2 or bias.shape != (w.shape[0],):
        raise ValueError(f"{w_path}: classifier.weight {w.shape} / bias {bias.shape} are not [K, D] / [K]")
    kernel = np.ascontiguousarray(w.T)
    if head is None:
        return {"classifier": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    if isinstance(head, nnx.Module):
        nnx.update(head, import_peft_head(adapter_dir, nnx.state(head)))
        return head
    if not isinstance(head, (nnx.State, dict)):
        raise TypeError(f"head must be None, the head module (model.head), its nnx.State or a dict holding "
                        f"'classifier', got {type(head).__name__}")
    is_state = isinstance(head, nnx.State)
    pure = nnx.to_pure_dict(head) if is_state else jax.tree.map(lambda x: x, dict(head))
    node = pure["head"] if "classifier" not in pure and "head" in pure else pure
    if "classifier" not in node:
        raise ValueError(f"head must hold 'classifier' (or 'head' -> 'classifier'), got keys {sorted(pure)}")
    ours = node["classifier"]
    shape = tuple(np.shape(ours["kernel"]))
    if shape != kernel.shape:
        raise ValueError(f"{w_path}: the saved classifier is [D={kernel.shape[0]}, K={kernel.shape[1]}] "
                         f"(weight {w.shape}), our head kernel is {shape}: load the model with "
                         f"num_labels={kernel.shape[1]}")
    node["classifier"] = {"kernel": jnp.asarray(kernel, jnp.asarray(ours["kernel"]).dtype),
                          "bias": jnp.asarray(bias, jnp.asarray(ours["bias"]).dtype)}
    if not is_state:
        return pure
    new_state = jax.tree.map(lambda x: x, head)
    nnx.replace_by_pure_dict(new_state, pure)
    return new_state
