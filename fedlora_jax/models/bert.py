"""BERT / RoBERTa / MiniLM encoder with a sequence-classification head (Flax NNX).

Architecture (post-LN, as in ``transformers``' ``BertModel``/``RobertaModel``): word +
absolute position + token-type embeddings -> LayerNorm -> L x [self-attention -> dense ->
residual -> LayerNorm -> dense -> GELU -> dense -> residual -> LayerNorm] -> pooling ->
classifier. No dropout (the frozen base is used deterministically; dropout of the LoRA path
is not modelled).

Adapter module names (``"layer.{i}.{module}"``): ``query, key, value, attn_out, ffn_in,
ffn_out``. With ``pooling="pooler"`` the pooler's dense (``[D, D]``, HF ``pooler.dense``) is also
adaptable under the key ``"layer.{L}.pooler"`` (``L = num_layers``: it runs after the last block),
listed by :meth:`EncoderClassifier.pooler_targets`, not by ``adapter_targets`` (PEFT interop;
the round machinery folds and schedules block modules only).

Pooling (``EncoderConfig.pooling``):
  * ``"pooler"``: the checkpoint's BERT pooler (dense + tanh on the first token), frozen
    with the base; requires pooler weights.
  * ``"cls"``: the first token's final hidden state.
  * ``"mean"``: mean of the final hidden states over real tokens.
ASSUMPTION: ``from_pretrained`` uses the pooling a sentence-transformers directory declares
(``1_Pooling/config.json``; MiniLM: mean), else ``"pooler"`` when the checkpoint has a pooler,
else ``"mean"``. The classifier ``head.classifier`` (``[D, num_labels]``) is new and trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.lora import LoraTree, MaskTree
from fedlora_jax.models import common, switches
from fedlora_jax.models.common import AdapterCall, Dense, Embed, LayerNorm, TargetInfo
from fedlora_jax.models.family import ModelFamily

Array = jax.Array

MODULES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
POOLER_MODULE = "pooler"
MODEL_TYPES = ("bert", "roberta")
POOLINGS = ("pooler", "cls", "mean")
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
_HF_SUFFIX = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static hyperparameters of a BERT-family encoder classifier.

    ``max_len`` is the longest usable sequence: ``max_position_embeddings`` for BERT,
    ``max_position_embeddings - pad_token_id - 1`` for RoBERTa (positions start after the
    padding index).

    ``cls_shortcut`` (default on): with ``pooling`` ``"cls"`` or ``"pooler"`` the classifier
    reads only the first position of the last block, so :meth:`EncoderClassifier.__call__`
    evaluates that block's query, attention, output projection, FFN and norms at the first
    position only (its keys and values still see every token). Logits and every gradient are
    the same as the full computation (tested); about ``1/num_layers`` of the forward and
    backward matmul FLOPs are skipped. ``False`` computes every position (as ``transformers``
    does).

    ``norm_barrier`` / ``merged_lora``: ``"auto"`` (default) | ``"on"`` | ``"off"``, the exact CPU
    speed-ups of :mod:`fedlora_jax.models.switches` (LayerNorm gradient barrier; float32 LoRA
    folded into the kernel). ``"auto"`` is resolved once when the model is built
    (:func:`~fedlora_jax.models.switches.resolve_switches`; ``"on"`` on the CPU backend, for
    ``merged_lora`` with float32 ``dtype``; ``"off"`` elsewhere), so ``model.config`` records the
    concrete choice.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    gelu_approximate: bool = False
    num_labels: int = 2
    pooling: str = "mean"
    cls_shortcut: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm_barrier: str = "auto"
    merged_lora: str = "auto"

    def __post_init__(self):
        switches.check_switches(self)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not supported by the encoder; "
                             f"expected one of {MODEL_TYPES}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads "
                             f"{self.num_heads}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        object.__setattr__(self, "dtype", common.canonical_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", common.canonical_dtype(self.param_dtype))

    @property
    def max_len(self) -> int:
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> EncoderConfig:
        """Build from a ``config.json`` dict; ``overrides`` set ``num_labels``, ``pooling``,
        ``dtype``, ``param_dtype``, ``norm_barrier``, ``merged_lora`` (any field). Raises
        ``ValueError`` on an unsupported ``model_type``, activation or position-embedding type."""
        mt = hf.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"config model_type {mt!r} is not a BERT-family encoder; "
                             f"supported: {MODEL_TYPES}")
        act = hf.get("hidden_act", "gelu")
        if act not in _GELU:
            raise ValueError(f"hidden_act {act!r} not supported; expected one of {sorted(_GELU)}")
        pet = hf.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} not supported (only 'absolute')")
        num_labels = len(hf["id2label"]) if "id2label" in hf else 2
        kw = dict(
            model_type=mt, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            gelu_approximate=_GELU[act], num_labels=num_labels,
        )
        kw.update(overrides)
        return cls(**kw)


class EncoderLayer(nnx.Module):
    """One post-LN transformer block. Adapted linears are attributes named by module."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        lin = dict(use_bias=True, param_dtype=pd, rngs=rngs,
                   use_merged_lora=switches.switch_on(cfg, "merged_lora"))
        norm = dict(eps=cfg.layer_norm_eps, param_dtype=pd, use_barrier=switches.switch_on(cfg, "norm_barrier"))
        self.query = Dense(d, d, **lin)
        self.key = Dense(d, d, **lin)
        self.value = Dense(d, d, **lin)
        self.attn_out = Dense(d, d, **lin)
        self.attn_norm = LayerNorm(d, **norm)
        self.ffn_in = Dense(d, f, **lin)
        self.ffn_out = Dense(f, d, **lin)
        self.ffn_norm = LayerNorm(d, **norm)
        self.num_heads, self.gelu_approximate = cfg.num_heads, cfg.gelu_approximate

    def __call__(self, h: Array, attention_mask: Array, *, i: int, adapter: AdapterCall,
                 dtype, query_rows: int | None = None) -> Array:
        """``[B, T, D] -> [B, T, D]``, or ``[B, query_rows, D]``: the block's output at the first
        ``query_rows`` positions only (keys and values still come from all ``T``)."""
        b, t, d = h.shape
        lin = lambda mod, x: getattr(self, mod)(x, dtype=dtype, key=f"layer.{i}.{mod}",
                                                 adapter=adapter)
        heads = lambda x: x.reshape(b, x.shape[1], self.num_heads, d // self.num_heads)
        hq = h if query_rows is None else h[:, :query_rows]
        q, k, v = heads(lin("query", hq)), heads(lin("key", h)), heads(lin("value", h))
        ctx = common.attention(q, k, v, attention_mask, causal=False).reshape(b, hq.shape[1], d)
        h = self.attn_norm(hq + lin("attn_out", ctx))
        ff = common.gelu(lin("ffn_in", h), self.gelu_approximate)
        return self.ffn_norm(h + lin("ffn_out", ff))


class ClassifierHead(nnx.Module):
    """The new, trained part: ``classifier: [D, num_labels]``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.classifier = Dense(cfg.hidden_size, cfg.num_labels, use_bias=True,
                                param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, pooled: Array) -> Array:
        """``[B, D] -> [B, num_labels]`` float32."""
        return self.classifier(pooled.astype(jnp.float32), dtype=jnp.float32)


class EncoderClassifier(nnx.Module):
    """BERT/RoBERTa encoder + pooling + classifier.

    Call: ``model(input_ids [B, T] int, attention_mask [B, T], *, lora=None, masks=None,
    scale=1.0, grad_cut_layer=None) -> logits [B, num_labels]`` (float32).
    Token-type ids are all 0 (single-segment inputs). ``self.config`` is ``cfg`` with its
    ``"auto"`` switches resolved (:func:`~fedlora_jax.models.switches.resolve_switches`).
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        cfg = switches.resolve_switches(cfg)
        d, pd = cfg.hidden_size, cfg.param_dtype
        self.config = cfg
        self.word_embeddings = Embed(cfg.vocab_size, d, param_dtype=pd, rngs=rngs)
        self.position_embeddings = Embed(cfg.max_position_embeddings, d, param_dtype=pd, rngs=rngs)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, d, param_dtype=pd, rngs=rngs)
        self.embed_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd,
                                    use_barrier=switches.switch_on(cfg, "norm_barrier"))
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.pooler = (Dense(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
                       if cfg.pooling == "pooler" else None)
        self.head = ClassifierHead(cfg, rngs=rngs)

    def adapter_targets(self, modules: Iterable[str] | None = None,
                        layers: Iterable[int] | None = None) -> dict[str, TargetInfo]:
        """``{"layer.{i}.{module}": TargetInfo}`` for the chosen modules/layers (default all)."""
        prefix = "roberta." if self.config.model_type == "roberta" else "bert."
        return common.layer_targets(self.layers, MODULES, modules, layers,
                                    lambda i, m: f"{prefix}encoder.layer.{i}.{_HF_SUFFIX[m]}")

    def pooler_targets(self) -> dict[str, TargetInfo]:
        """``{"layer.{L}.pooler": TargetInfo(L, "pooler", D, D, "<prefix>pooler.dense")}`` with
        ``L = num_layers``: the pooler's dense as an adapter target (the HF ``pooler.dense``).

        Raises ``ValueError`` unless the model pools with the pooler (``pooling="pooler"``)."""
        cfg = self.config
        if self.pooler is None:
            raise ValueError(f"the pooler is an adapter target only with pooling='pooler'; this model pools "
                             f"with {cfg.pooling!r}: load it with from_pretrained(..., pooling='pooler')")
        prefix = "roberta." if cfg.model_type == "roberta" else "bert."
        n = cfg.num_layers
        return {f"layer.{n}.{POOLER_MODULE}": TargetInfo(n, POOLER_MODULE, self.pooler.in_features,
                                                         self.pooler.out_features, f"{prefix}pooler.dense")}

    def _checked_targets(self) -> dict[str, TargetInfo]:
        """Every key a call accepts: :meth:`adapter_targets` plus the pooler (when used)."""
        targets = self.adapter_targets()
        if self.pooler is not None:
            targets.update(self.pooler_targets())
        return targets

    def position_ids(self, input_ids: Array) -> Array:
        """BERT: ``0..T-1``. RoBERTa: ``cumsum(ids != pad) * (ids != pad) + pad`` (``[B, T]``)."""
        cfg = self.config
        if cfg.model_type == "roberta":
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)

    def encode(self, input_ids: Array, attention_mask: Array, *, lora: LoraTree | None = None,
               masks: MaskTree | None = None, scale=1.0, grad_cut_layer=None, remat: bool = False,
               first_token_only: bool = False) -> Array:
        """Final hidden states ``[B, T, D]`` in ``config.dtype``.

        ``remat=True`` wraps each transformer block in ``jax.checkpoint``: only the block inputs
        are kept for the backward pass and the block is recomputed (less activation memory,
        about one extra forward of compute). ``first_token_only=True`` evaluates the last block
        at the first position only and returns ``[B, 1, D]`` (equal to ``[:, :1]`` of the full
        result; see ``EncoderConfig.cls_shortcut``)."""
        cfg = self.config
        common.check_inputs(input_ids, attention_mask, max_len=cfg.max_len)
        common.check_grad_cut(grad_cut_layer, cfg.num_layers)
        common.check_adapters(self._checked_targets(), lora, masks)
        dt = cfg.dtype
        h = (self.word_embeddings(input_ids, dtype=jnp.float32)
             + self.position_embeddings(self.position_ids(input_ids), dtype=jnp.float32)
             + self.token_type_embeddings(jnp.zeros_like(input_ids), dtype=jnp.float32))
        h = self.embed_norm(h).astype(dt)
        adapter = AdapterCall(lora, masks, scale)
        h = common.run_blocks(self.layers, h, attention_mask, adapter=adapter, dtype=dt,
                              grad_cut_layer=grad_cut_layer, remat=remat,
                              last_query_rows=1 if first_token_only else None)
        return h

    def pool(self, hidden: Array, attention_mask: Array, *, lora: LoraTree | None = None,
             masks: MaskTree | None = None, scale=1.0) -> Array:
        """``[B, T, D] -> [B, D]`` float32 by ``config.pooling``; with ``"pooler"`` the adapter
        ``lora["layer.{L}.pooler"]`` (if present) adapts the pooler's dense."""
        pooling = self.config.pooling
        if pooling == "mean":
            m = (attention_mask != 0).astype(jnp.float32)[..., None]
            s = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
            return s / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        first = hidden[:, 0]
        if pooling == "cls":
            return first.astype(jnp.float32)
        adapter = AdapterCall(lora, masks, scale)
        key = f"layer.{self.config.num_layers}.{POOLER_MODULE}"
        return jnp.tanh(self.pooler(first, dtype=self.config.dtype, key=key,
                                    adapter=adapter).astype(jnp.float32))

    def __call__(self, input_ids: Array, attention_mask: Array, *,
                 lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0,
                 grad_cut_layer=None, remat: bool = False) -> Array:
        """Logits ``[B, num_labels]`` float32 (``remat``: see :meth:`encode`; the last block
        runs at the first position only under ``config.cls_shortcut``)."""
        cfg = self.config
        h = self.encode(input_ids, attention_mask, lora=lora, masks=masks, scale=scale,
                        grad_cut_layer=grad_cut_layer, remat=remat,
                        first_token_only=cfg.cls_shortcut and cfg.pooling in ("cls", "pooler"))
        return self.head(self.pool(h, attention_mask, lora=lora, masks=masks, scale=scale))


# ------------------------------------------------------------------ Hugging Face key table

def hf_key_table(cfg: EncoderConfig) -> dict[str, tuple[tuple, bool]]:
    """``{hf_name (without the bert./roberta. prefix): (our state path, transpose)}``.

    Linear weights are ``[out, in]`` in PyTorch and transposed into ``kernel [in, out]``.
    The pooler entries appear only when ``cfg.pooling == "pooler"``; the classifier is
    listed under ``classifier.*`` (loaded when present with a matching shape).
    """
    t: dict[str, tuple[tuple, bool]] = {
        "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"), False),
        "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"), False),
        "embeddings.LayerNorm.weight": (("embed_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embed_norm", "bias"), False),
    }
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}."
        for mod, suffix in _HF_SUFFIX.items():
            t[f"{hf}{suffix}.weight"] = (("layers", i, mod, "kernel"), True)
            t[f"{hf}{suffix}.bias"] = (("layers", i, mod, "bias"), False)
        for norm, suffix in (("attn_norm", "attention.output.LayerNorm"),
                             ("ffn_norm", "output.LayerNorm")):
            t[f"{hf}{suffix}.weight"] = (("layers", i, norm, "scale"), False)
            t[f"{hf}{suffix}.bias"] = (("layers", i, norm, "bias"), False)
    if cfg.pooling == "pooler":
        t["pooler.dense.weight"] = (("pooler", "kernel"), True)
        t["pooler.dense.bias"] = (("pooler", "bias"), False)
    return t


HEAD_KEYS = {
    "classifier.weight": (("head", "classifier", "kernel"), True),
    "classifier.bias": (("head", "classifier", "bias"), False),
}
PREFIXES = {"bert": ("bert.",), "roberta": ("roberta.",)}
# Buffers and pre-training / other task heads that a checkpoint may hold and we do not use.
IGNORED = (r".*position_ids$", r"^pooler\..*", r"^cls\..*", r"^lm_head\..*",
           r"^classifier\.(dense|out_proj)\..*", r".*token_type_ids$")

FAMILY = ModelFamily(
    name="BERT/RoBERTa", model_types=MODEL_TYPES, config_cls=EncoderConfig, model_cls=EncoderClassifier,
    causal_lm=False, ffn_matrices=2, key_table=hf_key_table, prefixes=lambda cfg: PREFIXES[cfg.model_type],
    ignored=IGNORED, optional_keys=HEAD_KEYS, peft_target_names=("query", "key", "value", "dense"),
    peft_modules=((r"encoder\.layer\.(\d+)\.attention\.self\.query", "query"),
                  (r"encoder\.layer\.(\d+)\.attention\.self\.key", "key"),
                  (r"encoder\.layer\.(\d+)\.attention\.self\.value", "value"),
                  (r"encoder\.layer\.(\d+)\.attention\.output\.dense", "attn_out"),
                  (r"encoder\.layer\.(\d+)\.intermediate\.dense", "ffn_in"),
                  (r"encoder\.layer\.(\d+)\.output\.dense", "ffn_out"),
                  (r"pooler\.dense", "pooler")))   # no layer group: the pooler's key needs num_layers
