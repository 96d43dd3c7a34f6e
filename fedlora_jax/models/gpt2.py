"""GPT-2 causal language model (Flax NNX).

Pre-LN blocks: ``h += attn_proj(attn(c_attn(ln_1(h))))``, ``h += mlp_proj(gelu(mlp_fc(ln_2(h))))``,
then ``ln_f`` and the (tied) LM head. GPT-2's ``Conv1D`` weights are ``[in, out]`` already,
so the checkpoint loads without transposes. Positions are ``0..T-1`` (as ``transformers``
does when no ``position_ids`` are passed): pad on the right.

Adapter module names: ``c_attn`` (fused q/k/v, ``[D, 3D]``), ``attn_proj``, ``mlp_fc``,
``mlp_proj``.
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

MODULES = ("c_attn", "attn_proj", "mlp_fc", "mlp_proj")
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
_HF_SUFFIX = {"c_attn": "attn.c_attn", "attn_proj": "attn.c_proj", "mlp_fc": "mlp.c_fc",
              "mlp_proj": "mlp.c_proj"}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Static hyperparameters of GPT-2.

    ``norm_barrier`` / ``merged_lora``: the exact CPU speed-up switches, as in
    :class:`~fedlora_jax.models.bert.EncoderConfig` (resolved when the model is built).
    """

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm_barrier: str = "auto"
    merged_lora: str = "auto"

    def __post_init__(self):
        switches.check_switches(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads "
                             f"{self.num_heads}")
        object.__setattr__(self, "dtype", common.canonical_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", common.canonical_dtype(self.param_dtype))

    @property
    def max_len(self) -> int:
        return self.max_position_embeddings

    @property
    def model_type(self) -> str:
        return "gpt2"

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> GPT2Config:
        """Build from a GPT-2 ``config.json`` dict (``overrides``: ``dtype``, ``param_dtype``,
        ``norm_barrier``, ``merged_lora``, ...)."""
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"config model_type {hf.get('model_type')!r} is not 'gpt2'")
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU:
            raise ValueError(f"activation_function {act!r} not supported; expected one of "
                             f"{sorted(_GELU)}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError(f"GPT-2 option {flag}=True is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
        d = hf["n_embd"]
        kw = dict(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
                  num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * d,
                  max_position_embeddings=hf["n_positions"],
                  layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  gelu_approximate=_GELU[act],
                  tie_word_embeddings=hf.get("tie_word_embeddings", True))
        kw.update(overrides)
        return cls(**kw)


class GPT2Block(nnx.Module):
    """One pre-LN GPT-2 block; adapted linears are attributes named by module."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        lin = dict(use_bias=True, param_dtype=pd, rngs=rngs,
                   use_merged_lora=switches.switch_on(cfg, "merged_lora"))
        norm = dict(eps=cfg.layer_norm_eps, param_dtype=pd, use_barrier=switches.switch_on(cfg, "norm_barrier"))
        self.ln_1 = LayerNorm(d, **norm)
        self.c_attn = Dense(d, 3 * d, **lin)
        self.attn_proj = Dense(d, d, **lin)
        self.ln_2 = LayerNorm(d, **norm)
        self.mlp_fc = Dense(d, f, **lin)
        self.mlp_proj = Dense(f, d, **lin)
        self.num_heads, self.gelu_approximate = cfg.num_heads, cfg.gelu_approximate

    def _lin(self, i: int, adapter: AdapterCall, dtype):
        return lambda mod, x: getattr(self, mod)(x, dtype=dtype, key=f"layer.{i}.{mod}", adapter=adapter)

    def _qkv(self, h: Array, lin) -> Array:
        b, t, d = h.shape
        return lin("c_attn", self.ln_1(h)).reshape(b, t, 3, self.num_heads, d // self.num_heads)

    def _finish(self, h: Array, ctx: Array, lin) -> Array:
        b, t, d = h.shape
        h = h + lin("attn_proj", ctx.reshape(b, t, d))
        ff = common.gelu(lin("mlp_fc", self.ln_2(h)), self.gelu_approximate)
        return h + lin("mlp_proj", ff)

    def __call__(self, h: Array, attention_mask: Array, *, i: int, adapter: AdapterCall,
                 dtype) -> Array:
        """``[B, T, D] -> [B, T, D]``."""
        return self.prefill(h, attention_mask, i=i, adapter=adapter, dtype=dtype)[0]

    def prefill(self, h: Array, attention_mask: Array, *, i: int, adapter: AdapterCall,
                dtype) -> tuple[Array, Array, Array]:
        """The full causal forward, also returning keys and values ``[B, T, H, D]``."""
        lin = self._lin(i, adapter, dtype)
        qkv = self._qkv(h, lin)
        k, v = qkv[:, :, 1], qkv[:, :, 2]
        ctx = common.attention(qkv[:, :, 0], k, v, attention_mask, causal=True)
        return self._finish(h, ctx, lin), k, v

    def decode(self, h: Array, cache_k: Array, cache_v: Array, valid: Array, positions: Array, *,
               i: int, adapter: AdapterCall, dtype) -> tuple[Array, Array, Array]:
        """One new token per row (``h [B, 1, D]``) against the cache ``[B, Tc, H, D]``; see
        :meth:`fedlora_jax.models.llama.LlamaBlock.decode`."""
        lin = self._lin(i, adapter, dtype)
        qkv = self._qkv(h, lin)
        rows = jnp.arange(h.shape[0])
        cache_k = cache_k.at[rows, positions].set(qkv[:, 0, 1].astype(cache_k.dtype))
        cache_v = cache_v.at[rows, positions].set(qkv[:, 0, 2].astype(cache_v.dtype))
        ctx = common.attention(qkv[:, :, 0], cache_k, cache_v, valid, causal=False)
        return self._finish(h, ctx, lin), cache_k, cache_v


class GPT2LM(nnx.Module):
    """GPT-2 causal LM.

    Call: ``model(input_ids [B, T], attention_mask [B, T], *, lora=None, masks=None, scale=1.0,
    grad_cut_layer=None) -> logits [B, T, V]`` (float32). ``self.config`` is ``cfg`` with its
    ``"auto"`` switches resolved (:func:`~fedlora_jax.models.switches.resolve_switches`).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        cfg = switches.resolve_switches(cfg)
        d, pd = cfg.hidden_size, cfg.param_dtype
        self.config = cfg
        self.wte = Embed(cfg.vocab_size, d, param_dtype=pd, rngs=rngs)
        self.wpe = Embed(cfg.max_position_embeddings, d, param_dtype=pd, rngs=rngs, std=0.01)
        self.layers = nnx.List([GPT2Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd,
                              use_barrier=switches.switch_on(cfg, "norm_barrier"))
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(d, cfg.vocab_size, use_bias=False, param_dtype=pd, rngs=rngs))

    def adapter_targets(self, modules: Iterable[str] | None = None,
                        layers: Iterable[int] | None = None) -> dict[str, TargetInfo]:
        """``{"layer.{i}.{module}": TargetInfo}`` for the chosen modules/layers (default all)."""
        return common.layer_targets(self.layers, MODULES, modules, layers,
                                    lambda i, m: f"transformer.h.{i}.{_HF_SUFFIX[m]}")

    def hidden(self, input_ids: Array, attention_mask: Array, *, lora: LoraTree | None = None,
               masks: MaskTree | None = None, scale=1.0, grad_cut_layer=None, remat: bool = False) -> Array:
        """Final (``ln_f``-normalised) hidden states ``[B, T, D]`` in ``config.dtype``."""
        cfg = self.config
        common.check_inputs(input_ids, attention_mask, max_len=cfg.max_len)
        common.check_grad_cut(grad_cut_layer, cfg.num_layers)
        common.check_adapters(self.adapter_targets(), lora, masks)
        pos = jnp.arange(input_ids.shape[1])[None]
        h = (self.wte(input_ids, dtype=jnp.float32) + self.wpe(pos, dtype=jnp.float32)
             ).astype(cfg.dtype)
        adapter = AdapterCall(lora, masks, scale)
        h = common.run_blocks(self.layers, h, attention_mask, adapter=adapter, dtype=cfg.dtype,
                              grad_cut_layer=grad_cut_layer, remat=remat)
        return self.ln_f(h)

    def __call__(self, input_ids: Array, attention_mask: Array, *,
                 lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0,
                 grad_cut_layer=None, remat: bool = False) -> Array:
        """Logits ``[B, T, V]`` float32."""
        h = self.hidden(input_ids, attention_mask, lora=lora, masks=masks, scale=scale,
                        grad_cut_layer=grad_cut_layer, remat=remat)
        return common.lm_logits(h, self.lm_head, self.wte.embedding, self.config.dtype)

    def _embed(self, input_ids: Array, positions: Array) -> Array:
        return (self.wte(input_ids, dtype=jnp.float32) + self.wpe(positions, dtype=jnp.float32)
                ).astype(self.config.dtype)

    def prefill(self, input_ids: Array, attention_mask: Array, *, cache_len: int,
                lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0):
        """Prompt forward + KV cache of ``cache_len`` slots: ``(logits [B, T, V], KVCache)``
        (see :meth:`fedlora_jax.models.llama.LlamaLM.prefill`)."""
        cfg = self.config
        common.check_inputs(input_ids, attention_mask, max_len=cfg.max_len)
        common.check_adapters(self.adapter_targets(), lora, masks)
        b, t = input_ids.shape
        if not isinstance(cache_len, int) or not t <= cache_len <= cfg.max_len:
            raise ValueError(f"cache_len must be an int in [T={t}, max_len={cfg.max_len}], got {cache_len!r}")
        adapter = AdapterCall(lora, masks, scale)
        h = self._embed(input_ids, jnp.arange(t)[None])
        h, cache = common.prefill_blocks(self.layers, h, attention_mask, cache_len=cache_len, adapter=adapter,
                                         dtype=cfg.dtype)
        return common.lm_logits(self.ln_f(h), self.lm_head, self.wte.embedding, cfg.dtype), cache

    def decode_step(self, tokens: Array, positions: Array, cache, valid: Array, *,
                    lora: LoraTree | None = None, masks: MaskTree | None = None, scale=1.0):
        """One token per row at ``positions [B]``: ``(logits [B, V], KVCache)``."""
        cfg = self.config
        common.check_adapters(self.adapter_targets(), lora, masks)
        adapter = AdapterCall(lora, masks, scale)
        h = self._embed(tokens[:, None], positions[:, None])
        h, cache = common.decode_blocks(self.layers, h, cache, valid, positions, adapter=adapter, dtype=cfg.dtype)
        logits = common.lm_logits(self.ln_f(h), self.lm_head, self.wte.embedding, cfg.dtype)
        return logits[:, 0], cache


def hf_key_table(cfg: GPT2Config) -> dict[str, tuple[tuple, bool]]:
    """``{hf_name (without "transformer."): (our state path, transpose)}``; Conv1D is ``[in, out]``."""
    t: dict[str, tuple[tuple, bool]] = {
        "wte.weight": (("wte", "embedding"), False),
        "wpe.weight": (("wpe", "embedding"), False),
        "ln_f.weight": (("ln_f", "scale"), False),
        "ln_f.bias": (("ln_f", "bias"), False),
    }
    for i in range(cfg.num_layers):
        for mod, suffix in _HF_SUFFIX.items():
            t[f"h.{i}.{suffix}.weight"] = (("layers", i, mod, "kernel"), False)
            t[f"h.{i}.{suffix}.bias"] = (("layers", i, mod, "bias"), False)
        for ln in ("ln_1", "ln_2"):
            t[f"h.{i}.{ln}.weight"] = (("layers", i, ln, "scale"), False)
            t[f"h.{i}.{ln}.bias"] = (("layers", i, ln, "bias"), False)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (("lm_head", "kernel"), True)
    return t


PREFIXES = ("transformer.",)
IGNORED = (r".*\.attn\.bias$", r".*\.attn\.masked_bias$", r"^lm_head\.weight$")

FAMILY = ModelFamily(
    name="GPT-2", model_types=("gpt2",), config_cls=GPT2Config, model_cls=GPT2LM, causal_lm=True,
    ffn_matrices=2, key_table=hf_key_table, prefixes=lambda cfg: PREFIXES, ignored=IGNORED,
    peft_target_names=("c_attn", "c_proj", "c_fc"),
    peft_modules=((r"h\.(\d+)\.attn\.c_attn", "c_attn"), (r"h\.(\d+)\.attn\.c_proj", "attn_proj"),
                  (r"h\.(\d+)\.mlp\.c_fc", "mlp_fc"), (r"h\.(\d+)\.mlp\.c_proj", "mlp_proj")),
    fan_in_fan_out=("c_attn", "attn_proj", "mlp_fc", "mlp_proj"))   # HF's Conv1D stores [in, out]
