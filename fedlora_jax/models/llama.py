"""Llama-architecture causal LM covering Qwen2 (Flax NNX).

Pre-norm blocks with RMSNorm, rotary position embeddings (``rope_theta``; the
``rotate_half`` layout of ``transformers``), grouped-query attention, SwiGLU MLP, optional
q/k/v bias (Qwen2; Llama's ``attention_bias`` also biases ``o_proj``), tied or untied
embeddings. Positions are ``0..T-1``: pad on the right.

Cached generation (:mod:`fedlora_jax.models.generate`): :meth:`LlamaLM.prefill` runs the
right-padded prompt and returns a :class:`KVCache` whose slot ``p`` holds position ``p``;
:meth:`LlamaLM.decode_step` feeds one token per row at its own position (RoPE offset per row).

Adapter module names: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.lora import LoraTree, MaskTree
from fedlora_jax.models import common, switches
from fedlora_jax.models.common import AdapterCall, Dense, Embed, KVCache, RMSNorm, TargetInfo
from fedlora_jax.models.family import ModelFamily

Array = jax.Array

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_TYPES = ("llama", "qwen2")
_HF_SUFFIX = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
              "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
              "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static hyperparameters of a Llama / Qwen2 decoder.

    ``norm_barrier`` / ``merged_lora``: the exact CPU speed-up switches, as in
    :class:`~fedlora_jax.models.bert.EncoderConfig` (resolved when the model is built). RMSNorm's
    backward is autodiff's, with no barrier: ``norm_barrier`` resolves to ``"off"`` and ``"on"``
    is refused.
    """

    has_layer_norm: ClassVar[bool] = False

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm_barrier: str = "auto"
    merged_lora: str = "auto"

    def __post_init__(self):
        switches.check_switches(self)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not supported; expected one of "
                             f"{MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "dtype", common.canonical_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", common.canonical_dtype(self.param_dtype))

    @property
    def max_len(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> LlamaConfig:
        """Build from a Llama/Qwen2 ``config.json`` dict (``overrides``: ``dtype``,
        ``norm_barrier``, ``merged_lora``, ...).

        Reads ``rope_theta`` (transformers 4) or ``rope_parameters["rope_theta"]``
        (transformers 5). Raises ``ValueError`` on RoPE scaling, sliding windows, a non-SiLU
        activation or an unknown ``model_type``.
        """
        mt = hf.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"config model_type {mt!r} is not a Llama-architecture decoder; "
                             f"supported: {MODEL_TYPES}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.get('hidden_act')!r} not supported (only 'silu')")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} not supported (only 'default')")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        d, nh = hf["hidden_size"], hf["num_attention_heads"]
        qwen = mt == "qwen2"
        attn_bias = bool(hf.get("attention_bias", False))
        kw = dict(model_type=mt, vocab_size=hf["vocab_size"], hidden_size=d,
                  num_layers=hf["num_hidden_layers"], num_heads=nh,
                  num_kv_heads=hf.get("num_key_value_heads") or nh,
                  head_dim=hf.get("head_dim") or d // nh,
                  intermediate_size=hf["intermediate_size"],
                  max_position_embeddings=hf["max_position_embeddings"],
                  rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                  qkv_bias=qwen or attn_bias, o_bias=(not qwen) and attn_bias,
                  mlp_bias=bool(hf.get("mlp_bias", False)),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        kw.update(overrides)
        return cls(**kw)


def rope(x: Array, positions: Array, *, theta: float) -> Array:
    """Rotary embedding, ``transformers`` layout (halves rotated). ``x: [B, T, H, D]``,
    ``positions: [T]`` (shared by the rows) or ``[B, T]`` (per row, e.g. cached generation);
    angles and rotation in float32, result in ``x.dtype``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = positions.astype(jnp.float32)
    pos = pos[None] if pos.ndim == 1 else pos                          # [1|B, T]
    ang = pos[..., None] * inv_freq                                     # [1|B, T, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]           # [1|B, T, 1, D]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class LlamaBlock(nnx.Module):
    """One pre-norm Llama block; adapted linears are attributes named by module.

    ``megatron_groups``: modules split together when the block runs as one Megatron ``shard_map``
    (:func:`fedlora_jax.models.parallel.split_block`): attention on local heads, the MLP on local
    features. Its reshapes infer the head count, so the same code runs on local shards."""

    megatron_groups = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        lin = dict(param_dtype=pd, rngs=rngs, use_merged_lora=switches.switch_on(cfg, "merged_lora"))
        self.input_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.q_proj = Dense(d, hq, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = Dense(d, hk, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = Dense(d, hk, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = Dense(hq, d, use_bias=cfg.o_bias, **lin)
        self.post_attention_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.gate_proj = Dense(d, f, use_bias=cfg.mlp_bias, **lin)
        self.up_proj = Dense(d, f, use_bias=cfg.mlp_bias, **lin)
        self.down_proj = Dense(f, d, use_bias=cfg.mlp_bias, **lin)
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta

    def megatron_heads_ok(self, n_model: int) -> bool:
        """Whether query and key/value heads both split evenly over ``n_model`` devices."""
        return self.num_heads % n_model == 0 and self.num_kv_heads % n_model == 0

    def _qkv(self, x: Array, positions: Array, lin) -> tuple[Array, Array, Array]:
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hk, D]`` (q and k rotated at ``positions``; inside a
        Megatron block the local heads ``Hq / n``, ``Hk / n``)."""
        b, t, _ = x.shape
        q = rope(lin("q_proj", x).reshape(b, t, -1, self.head_dim), positions, theta=self.rope_theta)
        k = rope(lin("k_proj", x).reshape(b, t, -1, self.head_dim), positions, theta=self.rope_theta)
        v = lin("v_proj", x).reshape(b, t, -1, self.head_dim)
        return q, k, v

    def _finish(self, h: Array, ctx: Array, lin, dtype) -> Array:
        """Output projection, residual and the SwiGLU MLP."""
        b, t = ctx.shape[:2]
        h = h + lin("o_proj", ctx.reshape(b, t, -1))
        x = self.post_attention_norm(h)
        gate = jax.nn.silu(lin("gate_proj", x).astype(jnp.float32)).astype(dtype)
        return h + lin("down_proj", gate * lin("up_proj", x))

    def _lin(self, i: int, adapter: AdapterCall, dtype):
        return lambda mod, x: getattr(self, mod)(x, dtype=dtype, key=f"layer.{i}.{mod}", adapter=adapter)

    def __call__(self, h: Array, attention_mask: Array, *, i: int, adapter: AdapterCall,
                 dtype) -> Array:
        """``[B, T, D] -> [B, T, D]``."""
        return self.prefill(h, attention_mask, i=i, adapter=adapter, dtype=dtype)[0]

    def prefill(self, h: Array, attention_mask: Array, *, i: int, adapter: AdapterCall,
                dtype) -> tuple[Array, Array, Array]:
        """The full causal forward ``[B, T, D] -> [B, T, D]`` (positions ``0..T-1``), also
        returning this layer's keys and values ``[B, T, Hk, D]`` (rotated keys: a KV cache)."""
        lin = self._lin(i, adapter, dtype)
        q, k, v = self._qkv(self.input_norm(h), jnp.arange(h.shape[1]), lin)
        ctx = common.attention(q, k, v, attention_mask, causal=True)
        return self._finish(h, ctx, lin, dtype), k, v

    def decode(self, h: Array, cache_k: Array, cache_v: Array, valid: Array, positions: Array, *,
               i: int, adapter: AdapterCall, dtype) -> tuple[Array, Array, Array]:
        """One new token per row against the KV cache.

        Args:
          h: ``[B, 1, D]`` the new tokens' hidden states.
          cache_k, cache_v: ``[B, Tc, Hk, D]``; slot ``p`` holds position ``p``.
          valid: ``[B, Tc]`` slots the new token may attend to (its own slot included).
          positions: ``[B]`` position (= cache slot) of each row's new token.

        Returns:
          ``(h [B, 1, D], cache_k, cache_v)`` with the new keys/values written at ``positions``.
        """
        lin = self._lin(i, adapter, dtype)
        q, k, v = self._qkv(self.input_norm(h), positions[:, None], lin)
        rows = jnp.arange(h.shape[0])
        cache_k = cache_k.at[rows, positions].set(k[:, 0].astype(cache_k.dtype))
        cache_v = cache_v.at[rows, positions].set(v[:, 0].astype(cache_v.dtype))
        ctx = common.attention(q, cache_k, cache_v, valid, causal=False)
        return self._finish(h, ctx, lin, dtype), cache_k, cache_v


class LlamaLM(nnx.Module):
    """Llama / Qwen2 causal LM.

    Call: ``model(input_ids [B, T], attention_mask [B, T], *, lora=None, masks=None, scale=1.0,
    grad_cut_layer=None) -> logits [B, T, V]`` (float32). ``self.config`` is ``cfg`` with its
    ``"auto"`` switches resolved (:func:`~fedlora_jax.models.switches.resolve_switches`).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        cfg = switches.resolve_switches(cfg)
        d, pd = cfg.hidden_size, cfg.param_dtype
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, d, param_dtype=pd, rngs=rngs)
        self.layers = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(d, cfg.vocab_size, use_bias=False, param_dtype=pd, rngs=rngs))

    def adapter_targets(self, modules: Iterable[str] | None = None,
                        layers: Iterable[int] | None = None) -> dict[str, TargetInfo]:
        """``{"layer.{i}.{module}": TargetInfo}`` for the chosen modules/layers (default all)."""
        return common.layer_targets(self.layers, MODULES, modules, layers,
                                    lambda i, m: f"model.layers.{i}.{_HF_SUFFIX[m]}")

    def hidden(self, input_ids: Array, attention_mask: Array, *, lora: LoraTree | None = None,
               masks: MaskTree | None = None, scale=1.0, grad_cut_layer=None, remat: bool = False) -> Array:
        """Final (normalised) hidden states ``[B, T, D]`` in ``config.dtype``."""
        cfg = self.config
        common.check_inputs(input_ids, attention_mask, max_len=cfg.max_len)
        common.check_grad_cut(grad_cut_layer, cfg.num_layers)
        common.check_adapters(self.adapter_targets(), lora, masks)
        h = self.embed_tokens(input_ids, dtype=cfg.dtype)
        adapter = AdapterCall(lora, masks, scale)
        h = common.run_blocks(self.layers, h, attention_mask, adapter=adapter, dtype=cfg.dtype,
                              grad_cut_layer=grad_cut_layer, remat=remat)
        return self.norm(h)

    def __call__(self, input_ids: Array, attention_mask: Array, *,
                 lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0,
                 grad_cut_layer=None, remat: bool = False) -> Array:
        """Logits ``[B, T, V]`` float32."""
        h = self.hidden(input_ids, attention_mask, lora=lora, masks=masks, scale=scale,
                        grad_cut_layer=grad_cut_layer, remat=remat)
        return common.lm_logits(h, self.lm_head, self.embed_tokens.embedding, self.config.dtype)

    def prefill(self, input_ids: Array, attention_mask: Array, *, cache_len: int,
                lora: LoraTree | None = None, masks: MaskTree | None = None,
                scale=1.0) -> tuple[Array, KVCache]:
        """Run the prompt (right-padded, positions ``0..T-1``) and build the KV cache.

        Returns ``(logits [B, T, V] float32, KVCache)`` with ``Tc = cache_len >= T`` slots
        (slots ``>= T`` zero). The logits equal ``self(input_ids, attention_mask, ...)``.
        """
        cfg = self.config
        common.check_inputs(input_ids, attention_mask, max_len=cfg.max_len)
        common.check_adapters(self.adapter_targets(), lora, masks)
        b, t = input_ids.shape
        if not isinstance(cache_len, int) or not t <= cache_len <= cfg.max_len:
            raise ValueError(f"cache_len must be an int in [T={t}, max_len={cfg.max_len}], got {cache_len!r}")
        adapter = AdapterCall(lora, masks, scale)
        h = self.embed_tokens(input_ids, dtype=cfg.dtype)
        h, cache = common.prefill_blocks(self.layers, h, attention_mask, cache_len=cache_len, adapter=adapter,
                                         dtype=cfg.dtype)
        return common.lm_logits(self.norm(h), self.lm_head, self.embed_tokens.embedding, cfg.dtype), cache

    def decode_step(self, tokens: Array, positions: Array, cache: KVCache, valid: Array, *,
                    lora: LoraTree | None = None, masks: MaskTree | None = None,
                    scale=1.0) -> tuple[Array, KVCache]:
        """One generation step: ``tokens [B]`` at ``positions [B]`` (their cache slots),
        attending to the slots where ``valid [B, Tc]`` is nonzero (the new slot included).

        Returns ``(logits [B, V] float32, updated KVCache)``.
        """
        cfg = self.config
        common.check_adapters(self.adapter_targets(), lora, masks)
        adapter = AdapterCall(lora, masks, scale)
        h = self.embed_tokens(tokens[:, None], dtype=cfg.dtype)
        h, cache = common.decode_blocks(self.layers, h, cache, valid, positions, adapter=adapter, dtype=cfg.dtype)
        logits = common.lm_logits(self.norm(h), self.lm_head, self.embed_tokens.embedding, cfg.dtype)
        return logits[:, 0], cache


def hf_key_table(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """``{hf_name (without "model."): (our state path, transpose)}``; ``[out, in]`` -> kernel."""
    t: dict[str, tuple[tuple, bool]] = {
        "embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "norm.weight": (("norm", "scale"), False),
    }
    bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias,
            "o_proj": cfg.o_bias, "gate_proj": cfg.mlp_bias, "up_proj": cfg.mlp_bias,
            "down_proj": cfg.mlp_bias}
    for i in range(cfg.num_layers):
        for mod, suffix in _HF_SUFFIX.items():
            t[f"layers.{i}.{suffix}.weight"] = (("layers", i, mod, "kernel"), True)
            if bias[mod]:
                t[f"layers.{i}.{suffix}.bias"] = (("layers", i, mod, "bias"), False)
        t[f"layers.{i}.input_layernorm.weight"] = (("layers", i, "input_norm", "scale"), False)
        t[f"layers.{i}.post_attention_layernorm.weight"] = (
            ("layers", i, "post_attention_norm", "scale"), False)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (("lm_head", "kernel"), True)
    return t


PREFIXES = ("model.",)
IGNORED = (r".*rotary_emb\.inv_freq$", r"^lm_head\.weight$")

_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
FAMILY = ModelFamily(
    name="Llama/Qwen2", model_types=MODEL_TYPES, config_cls=LlamaConfig, model_cls=LlamaLM, causal_lm=True,
    ffn_matrices=3, key_table=hf_key_table, prefixes=lambda cfg: PREFIXES, ignored=IGNORED,
    peft_target_names=_ATTN + _MLP,
    peft_modules=tuple((rf"layers\.(\d+)\.self_attn\.{m}", m) for m in _ATTN)
    + tuple((rf"layers\.(\d+)\.mlp\.{m}", m) for m in _MLP))
