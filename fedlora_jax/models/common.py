"""Pieces shared by the model files: linear layers with an optional LoRA path, norms,
attention masks, the layer-freezing rule (``grad_cut_layer``), round splitting and merging.

Every adapted linear is an :class:`Dense` stored as an attribute named after its module
(``layers[i].<module>.kernel``), so the adapter key ``"layer.{i}.{module}"`` maps to the state
path ``("layers", i, module, "kernel")`` in every architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree
from fedlora_jax.models import norm_vjp, parallel

Array = jax.Array

KEY_RE = re.compile(r"^layer\.(\d+)\.([A-Za-z_]+)$")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TargetInfo(NamedTuple):
    """One adaptable matrix ``w: [N, M]`` of a model.

    Attributes:
      layer: layer index ``i``.
      module: module name (e.g. ``"query"``).
      in_features: ``N``.
      out_features: ``M``.
      hf_path: the module's path in the matching ``transformers`` class (used by PEFT export),
        e.g. ``"bert.encoder.layer.3.attention.self.query"``.
    """

    layer: int
    module: str
    in_features: int
    out_features: int
    hf_path: str = ""


class AdapterCall(NamedTuple):
    """The per-call adapter arguments threaded through the layers."""

    lora: LoraTree | None
    masks: MaskTree | None
    scale: Any


def canonical_dtype(dtype) -> Any:
    """Accept ``jnp.float32``/``"bfloat16"``/... and return a numpy dtype; reject non-floats."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dt}")
    return dt


def cast_dtype(x: Array, dtype) -> Array:
    return x if x.dtype == dtype else x.astype(dtype)


def merged_lora_enabled(use_merged_lora: bool, dtype) -> bool:
    """Whether a :class:`Dense` built with ``use_merged_lora`` computes an adapted linear at
    compute ``dtype`` as ``x @ (w + delta_w)`` (:func:`fedlora_jax.lora.apply_merged`) instead of
    base + low-rank path: float32 compute only; half precision always keeps the low-rank path
    (folding a small ``delta_w`` into a bfloat16 kernel would round it away).

    The model configs set ``use_merged_lora`` from their ``merged_lora`` field (see
    :mod:`fedlora_jax.models.switches`).
    """
    return bool(use_merged_lora) and jnp.dtype(dtype) == jnp.float32


class Dense(nnx.Module):
    """A frozen linear map ``y = x @ kernel (+ bias)`` with ``kernel: [N, M]`` (Flax orientation).

    ``use_merged_lora``: fold the LoRA path into the kernel for float32 compute (see
    :func:`merged_lora_enabled`); the models pass their config's ``merged_lora``.
    """

    def __init__(self, n: int, m: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs,
                 std: float = 0.02, use_merged_lora: bool = False):
        w = std * jax.random.normal(rngs.params(), (n, m), jnp.float32)
        self.kernel = nnx.Param(w.astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((m,), param_dtype)) if use_bias else None
        self.in_features, self.out_features = n, m
        self.use_merged_lora = bool(use_merged_lora)

    def __call__(self, x: Array, *, dtype, key: str | None = None,
                 adapter: AdapterCall | None = None) -> Array:
        """``[..., N] -> [..., M]`` in ``dtype``; adds the LoRA path when ``adapter.lora[key]``
        exists: folded into the kernel when :func:`merged_lora_enabled` (``use_merged_lora``
        and float32 compute), else as a low-rank path which, with a mask, runs under ``lax.cond`` and is
        skipped when the whole mask is zero (an unbatched mask; under ``vmap`` the cond
        becomes a select). Inside :func:`fedlora_jax.models.parallel.megatron` a kernel split
        over ``"model"`` (:func:`~fedlora_jax.models.parallel.megatron_dim` of the module named
        by ``key``) runs on its local shard inside its block's ``shard_map``, or as its own
        column- or row-parallel ``shard_map``."""
        w = self.kernel[...]
        b = None if self.bias is None else self.bias[...]
        factors = mask = None
        if adapter is not None and adapter.lora is not None and key is not None:
            factors = adapter.lora.get(key)
            if factors is not None and adapter.masks is not None:
                mask = adapter.masks.get(key)
        scale = None if adapter is None else adapter.scale
        merged = merged_lora_enabled(self.use_merged_lora, dtype)

        def apply(x_, w_, b_, factors_, mask_):
            return dense_forward(x_, w_, b_, factors_, mask_, scale=scale, dtype=dtype, merged=merged)

        # Megatron (fedlora_jax.models.parallel): one straight-line program per shard, so no
        # merged fold and no cond there
        m = KEY_RE.match(key or "")
        module = m and m.group(2)
        straight = lambda *args: dense_forward(*args, scale=scale, dtype=dtype, merged=False,  # noqa: E731
                                               skip_zero_mask=False)
        local = parallel.local_dims()
        if local is not None:          # inside a block's shard_map: w is this device's shard
            return parallel.local_linear(straight, x, w, b, factors, mask, dim=local.get(module))
        mesh = parallel.active_mesh()
        dim = None if mesh is None else parallel.megatron_dim(module, w.shape, mesh.shape["model"])
        if dim is not None:
            return parallel.split_linear(straight, x, w, b, factors, mask, dim=dim, mesh=mesh)
        return apply(x, w, b, factors, mask)


def dense_forward(x: Array, w: Array, b: Array | None, factors: LoraFactors | None, mask: Array | None, *,
                  scale, dtype, merged: bool, skip_zero_mask: bool = True) -> Array:
    """:class:`Dense`'s computation as a pure function: ``x [..., N]``, ``w [N, M]``, ``b [M]`` or
    ``None``, ``factors`` (``a [N, R]``, ``b [R, M]``, optional ``e [R]``) or ``None`` (no LoRA
    path), ``mask [R]`` or ``None``; ``merged``: fold the LoRA path into the kernel (float32);
    ``skip_zero_mask``: skip the low-rank path under ``lax.cond`` when the whole mask is zero."""
    if factors is None:
        y = cast_dtype(x, dtype) @ cast_dtype(w, dtype)
        return y if b is None else y + cast_dtype(b, dtype)
    if merged:
        return lora_lib.apply_merged(cast_dtype(x, dtype), w, factors, mask, scale=scale, bias=b)
    if mask is None or not skip_zero_mask:
        return lora_lib.apply(x, w, factors, mask, scale=scale, bias=b, compute_dtype=dtype)
    base = cast_dtype(x, dtype) @ cast_dtype(w, dtype)
    if b is not None:
        base = base + cast_dtype(b, dtype)

    def low_rank(operands):
        xx, ff, mm = operands
        return lora_lib.lora_delta_out(xx, ff, mm, scale=scale, compute_dtype=dtype).astype(base.dtype)

    skip = lambda operands: jnp.zeros_like(base)
    return base + jax.lax.cond(jnp.any(mask != 0), low_rank, skip, (x, factors, mask))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32, output in the input's dtype.

    ``use_barrier``: materialise the input gradient behind :func:`norm_vjp.cotangent_barrier`
    (an XLA:CPU workaround, see :mod:`norm_vjp`); the models pass their config's
    ``norm_barrier``.
    """

    def __init__(self, d: int, *, eps: float, param_dtype, use_barrier: bool = False):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype))
        self.eps = eps
        self.use_barrier = bool(use_barrier)

    def __call__(self, x: Array) -> Array:
        """``[..., D] -> [..., D]``; the backward pass is :func:`norm_vjp.layer_norm`'s (same
        gradients as autodiff; with ``use_barrier`` without XLA:CPU's duplicated fusions)."""
        return norm_vjp.layer_norm(x, self.scale[...], self.bias[...], eps=self.eps, barrier=self.use_barrier)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: ``w * (x / rms(x))``, normalised in float32 (as ``transformers`` does)."""

    def __init__(self, d: int, *, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)
                ).astype(x.dtype)


class Embed(nnx.Module):
    """A lookup table ``[V, D]``."""

    def __init__(self, v: int, d: int, *, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        w = std * jax.random.normal(rngs.params(), (v, d), jnp.float32)
        self.embedding = nnx.Param(w.astype(param_dtype))

    def __call__(self, ids: Array, *, dtype) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


def gelu(x: Array, approximate: bool) -> Array:
    """GELU in float32, returned in ``x.dtype``: exact ``0.5 x (1 + erf(x / sqrt 2))`` (the
    formula ``transformers`` uses; cheaper on XLA:CPU than ``jax.nn.gelu``'s ``erfc`` form) or
    the tanh approximation."""
    xf = x.astype(jnp.float32)
    if approximate:
        return jax.nn.gelu(xf, approximate=True).astype(x.dtype)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * np.float32(1.0 / np.sqrt(2.0))))).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, attention_mask: Array, *, causal: bool) -> Array:
    """Scaled dot-product attention with key padding (and causal) masking.

    Args:
      q: ``[B, Tq, Hq, D]``; k, v: ``[B, T, Hk, D]`` with ``Hq % Hk == 0`` (grouped queries);
        ``Tq`` may be smaller than ``T`` (queries at the first ``Tq`` positions) when not causal.
      attention_mask: ``[B, T]``, nonzero = real token (keys with 0 are ignored).
      causal: add the lower-triangular mask.

    Returns:
      ``[B, Tq, Hq, D]`` in ``q.dtype``. Scores and softmax are float32. Rows with no visible
      key (a padded query under a causal mask and left padding) get a finite arbitrary value
      (uniform weights), never NaN.

    The backward pass is written out (:func:`_attention_core`'s VJP reuses the saved
    probabilities and takes the softmax row term from the saved output), and multi-head
    attention (``Hq == Hk``) runs on 4-D ``[B, H, T, D]`` blocks without a group axis (XLA:CPU
    copied the probabilities around a size-1 group axis); measurements (ad-hoc A/B runs and
    the noisier stored round rows) are in ``benchmarks/README.md``. Values and gradients
    equal ``jax.nn.dot_product_attention``'s (tested, grouped and multi-head).
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    if hq % hk:
        raise ValueError(f"query heads {hq} not a multiple of key/value heads {hk}")
    if causal and t != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {t} and {k.shape[1]}")
    g = hq // hk
    visible = (attention_mask != 0)[:, None, None, :]                # [B, 1, 1, Tk]
    if causal:
        visible = visible & jnp.tril(jnp.ones((t, t), bool))[None, None]
    bias = jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)      # [B, 1, Tq|1, Tk]
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # [B, Hk, T, D]
    if g == 1:                                                      # multi-head: no group axis
        out = _attention_core(q.transpose(0, 2, 1, 3), kk, vv, bias)   # [B, H, Tq, D]
        return out.transpose(0, 2, 1, 3).astype(q.dtype)
    qg = q.reshape(b, t, hk, g, d).transpose(0, 2, 3, 1, 4)          # [B, Hk, G, Tq, D]
    out = _attention_core(qg, kk, vv, bias[:, :, None])             # [B, Hk, G, Tq, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


_MASKED = -1e30


def _lead(q: Array) -> str:
    """Einsum letters before ``q d`` of a query block: ``"bh"`` (``[B, H, Tq, D]``) or ``"bhg"``
    (grouped ``[B, Hk, G, Tq, D]``)."""
    return "bhg" if q.ndim == 5 else "bh"


def _attention_probs(q, k, bias):
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    lead = _lead(q)
    s = jnp.einsum(f"{lead}qd,bhkd->{lead}qk", q, k, preferred_element_type=jnp.float32) * scale + bias
    s = s - jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=-1, keepdims=True)


@jax.custom_vjp
def _attention_core(q: Array, k: Array, v: Array, bias: Array) -> Array:
    """``softmax(q k^T / sqrt(D) + bias) v`` on ``q [B, H, Tq, D]`` (or grouped
    ``[B, Hk, G, Tq, D]``), ``k, v [B, Hk, T, D]``, ``bias`` float32 broadcastable to the scores
    (no gradient). Returns float32 ``q``-shaped output."""
    return _attention_core_fwd(q, k, v, bias)[0]


def _attention_core_fwd(q, k, v, bias):
    p = _attention_probs(q, k, bias)
    lead = _lead(q)
    out = jnp.einsum(f"{lead}qk,bhkd->{lead}qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, (q, k, v, p, out, bias)


def _attention_core_bwd(res, g):
    """Softmax backward with ``rowsum(dp * p) = rowsum(g * out)`` (FlashAttention's identity):
    the row term comes from ``[Tq, D]`` arrays, so ``ds`` is elementwise in ``dp``."""
    q, k, v, p, out, bias = res
    lead = _lead(q)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    g = g.astype(jnp.float32)
    dv = jnp.einsum(f"{lead}qk,{lead}qd->bhkd", p, g)
    dp = jnp.einsum(f"{lead}qd,bhkd->{lead}qk", g, v.astype(jnp.float32))
    ds = p * (dp - jnp.sum(g * out, axis=-1, keepdims=True)) * scale
    dq = jnp.einsum(f"{lead}qk,bhkd->{lead}qd", ds, k.astype(jnp.float32))
    dk = jnp.einsum(f"{lead}qk,{lead}qd->bhkd", ds, q.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(bias)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def check_inputs(input_ids: Array, attention_mask: Array, *, max_len: int | None) -> None:
    """Eager shape/dtype checks of the call inputs (static, so they also run under jit)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer, got {input_ids.dtype}")
    if attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape):
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {got}")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"sequence length T={input_ids.shape[1]} exceeds the model's maximum of "
                         f"{max_len} positions; truncate the inputs")


def check_adapters(targets: Mapping[str, TargetInfo], lora: LoraTree | None,
                   masks: MaskTree | None) -> None:
    """Check adapter keys and shapes against ``targets`` (static information only)."""
    if lora is None:
        return
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be a dict of LoraFactors, got {type(lora).__name__}")
    unknown = sorted(set(lora) - set(targets))
    if unknown:
        raise ValueError(f"lora has keys {unknown[:5]} that are not adapter targets of this model; "
                         f"valid keys look like {sorted(targets)[:3]}... "
                         f"(see model.adapter_targets())")
    for k, f in lora.items():
        t = targets[k]
        if f.a.shape[-2] != t.in_features or f.b.shape[-1] != t.out_features:
            raise ValueError(f"lora[{k!r}]: a {tuple(f.a.shape)} / b {tuple(f.b.shape)} do not fit "
                             f"the [{t.in_features}, {t.out_features}] kernel "
                             "(expected a [N, R], b [R, M])")
        if masks is not None and k in masks and masks[k].shape[-1] != f.a.shape[-1]:
            raise ValueError(f"masks[{k!r}] has {masks[k].shape[-1]} ranks, lora has {f.a.shape[-1]}")


def select_targets(all_modules: tuple[str, ...], n_layers: int, modules: Iterable[str] | None,
                   layers: Iterable[int] | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Validate ``modules``/``layers`` arguments of ``adapter_targets``."""
    if isinstance(modules, str):
        modules = (modules,)
    mods = all_modules if modules is None else tuple(modules)
    bad = [m for m in mods if m not in all_modules]
    if bad:
        raise ValueError(f"unknown module name(s) {bad}; valid modules for this model: "
                         f"{list(all_modules)}")
    lays = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
    bad_l = [i for i in lays if not 0 <= i < n_layers]
    if bad_l:
        raise ValueError(f"layers {bad_l} out of range: the model has {n_layers} layers "
                         f"(valid 0..{n_layers - 1})")
    return mods, lays


def check_grad_cut(grad_cut_layer, n_layers: int) -> None:
    if grad_cut_layer is None:
        return
    if isinstance(grad_cut_layer, bool):
        raise TypeError("grad_cut_layer must be None, an int or an int32 array, got a bool")
    if isinstance(grad_cut_layer, (int, np.integer)):
        if not 0 <= grad_cut_layer <= n_layers:
            raise ValueError(f"grad_cut_layer={grad_cut_layer} out of range [0, {n_layers}]")
        return
    arr = jnp.asarray(grad_cut_layer) if not isinstance(grad_cut_layer, jax.Array) else grad_cut_layer
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"grad_cut_layer array must be an integer scalar, got shape "
                        f"{tuple(arr.shape)} dtype {arr.dtype}")


def cut_after_layer(h: Array, i: int, grad_cut_layer) -> Array:
    """Block gradients into layers ``< k`` after layer ``i`` ran (``k = grad_cut_layer``).

    Static ``k`` (Python int): ``stop_gradient`` once, after layer ``k - 1``, so the backward
    pass of layers ``< k`` is never built. Dynamic ``k`` (array): ``where(i < k, sg(h), h)``
    after every layer (same gradients, no recompile when ``k`` changes).
    """
    if grad_cut_layer is None:
        return h
    if isinstance(grad_cut_layer, (int, np.integer)):
        return jax.lax.stop_gradient(h) if i == grad_cut_layer - 1 else h
    return jnp.where(i < grad_cut_layer, jax.lax.stop_gradient(h), h)


def run_blocks(layers, h: Array, attention_mask: Array, *, adapter: AdapterCall, dtype, grad_cut_layer=None,
               remat: bool = False, last_query_rows: int | None = None) -> Array:
    """Run the transformer blocks in order: optional ``jax.checkpoint`` per block (``remat``:
    only block inputs are kept for the backward pass) and the gradient cut after each block
    (see :func:`cut_after_layer`). Every block is called ``block(h, attention_mask, i=, adapter=,
    dtype=)``; with ``last_query_rows`` the last block also gets ``query_rows=last_query_rows``
    (its output only at the first positions, see ``bert.EncoderLayer``)."""
    last = len(layers) - 1
    mesh = parallel.active_mesh()
    for i, layer in enumerate(layers):
        rows = {"query_rows": last_query_rows} if i == last and last_query_rows is not None else {}
        block = lambda hh, layer=layer, i=i, rows=rows: layer(hh, attention_mask, i=i, adapter=adapter,
                                                              dtype=dtype, **rows)
        dims = None if mesh is None else parallel.block_dims(layer, mesh.shape["model"])
        if dims:   # Megatron: the whole block as one shard_map over "model"
            block = _split_block(layer, i, attention_mask, adapter, dtype, rows, dims, mesh)
        h = jax.checkpoint(block)(h) if remat else block(h)
        h = cut_after_layer(h, i, grad_cut_layer)
    return h


def _split_block(layer, i: int, attention_mask: Array, adapter: AdapterCall, dtype, rows: dict, dims, mesh):
    """``h -> layer(h, ...)`` as one :func:`parallel.split_block`, with layer ``i``'s adapters only."""
    def mine(tree):
        return None if tree is None else {k: v for k, v in tree.items() if (m := KEY_RE.match(k)) and
                                          int(m.group(1)) == i}

    def call(layer_l, hh, am, lo, ma, sc):
        return layer_l(hh, am, i=i, adapter=AdapterCall(lo, ma, sc), dtype=dtype, **rows)

    return lambda hh: parallel.split_block(call, layer, hh, attention_mask, mine(adapter.lora), mine(adapter.masks),
                                           adapter.scale, dims=dims, mesh=mesh)


class KVCache(NamedTuple):
    """Keys and values of every layer for cached generation (slot ``p`` = position ``p``).

    Attributes:
      k, v: ``[L, B, Tc, Hk, D]`` in the model's compute dtype (keys already rotated).
    """

    k: Array
    v: Array


def prefill_blocks(layers, h: Array, attention_mask: Array, *, cache_len: int, adapter: AdapterCall,
                   dtype) -> tuple[Array, KVCache]:
    """The prompt through every block (each ``layer.prefill(h, attention_mask, i=, adapter=,
    dtype=) -> (h, k, v)``), keys/values zero-padded from ``T`` to ``cache_len`` slots:
    ``h [B, T, D]`` -> ``(h, KVCache [L, B, cache_len, Hk, D])``."""
    pad = ((0, 0), (0, cache_len - h.shape[1]), (0, 0), (0, 0))
    ks, vs = [], []
    for i, layer in enumerate(layers):
        h, k, v = layer.prefill(h, attention_mask, i=i, adapter=adapter, dtype=dtype)
        ks.append(jnp.pad(k.astype(dtype), pad))
        vs.append(jnp.pad(v.astype(dtype), pad))
    return h, KVCache(jnp.stack(ks), jnp.stack(vs))


def decode_blocks(layers, h: Array, cache: KVCache, valid: Array, positions: Array, *, adapter: AdapterCall,
                  dtype) -> tuple[Array, KVCache]:
    """One cached decoding step through every block (each ``layer.decode(h, k, v, valid,
    positions, i=, adapter=, dtype=) -> (h, k, v)``): ``h [B, 1, D]`` -> ``(h, updated cache)``."""
    ks, vs = [], []
    for i, layer in enumerate(layers):
        h, k, v = layer.decode(h, cache.k[i], cache.v[i], valid, positions, i=i, adapter=adapter, dtype=dtype)
        ks.append(k)
        vs.append(v)
    return h, KVCache(jnp.stack(ks), jnp.stack(vs))


def lm_logits(h: Array, lm_head, embedding, dtype) -> Array:
    """Causal-LM logits ``[B, T, V]`` float32: through ``lm_head`` or, with tied embeddings
    (``lm_head is None``), through the transposed token embedding ``[V, D]``."""
    if lm_head is None:
        return (h @ embedding[...].astype(dtype).T).astype(jnp.float32)
    return lm_head(h, dtype=dtype).astype(jnp.float32)


def layer_targets(layers, all_modules: tuple[str, ...], modules: Iterable[str] | None,
                  layer_ids: Iterable[int] | None, hf_path) -> dict[str, TargetInfo]:
    """``{"layer.{i}.{module}": TargetInfo}`` for the chosen modules/layers of a block stack;
    ``hf_path(i, module)`` gives the Hugging Face module path (for PEFT export)."""
    mods, lays = select_targets(all_modules, len(layers), modules, layer_ids)
    out = {}
    for i in lays:
        for m in mods:
            dense = getattr(layers[i], m)
            out[f"layer.{i}.{m}"] = TargetInfo(i, m, dense.in_features, dense.out_features, hf_path(i, m))
    return out


# ------------------------------------------------------------------- round helpers

HEAD_FILTER = nnx.PathContains("head")


def split_for_round(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, base_state, head_state)``: the frozen base and the trainable head.

    The head is the encoder's classifier (``model.head``); decoders return an empty ``State``.
    """
    graphdef, head_state, base_state = nnx.split(model, HEAD_FILTER, ...)
    return graphdef, base_state, head_state


def functional_forward(graphdef: nnx.GraphDef, base_state: nnx.State, head_state: nnx.State,
                       input_ids: Array, attention_mask: Array, *, lora: LoraTree | None,
                       masks: MaskTree | None, scale, grad_cut_layer=None, **model_kwargs) -> Array:
    """Pure forward for ``jit``/``vmap``: merges ``(graphdef, base, head)`` and calls the model.

    ``model_kwargs`` go to the model call (e.g. ``remat=True`` for the encoder).
    Returns the model's output: ``[B, num_labels]`` (encoders) or ``[B, T, V]`` (decoders).
    """
    model = nnx.merge(graphdef, base_state, head_state)
    return model(input_ids, attention_mask, lora=lora, masks=masks, scale=scale,
                 grad_cut_layer=grad_cut_layer, **model_kwargs)


def _kernel_path(key: str) -> tuple:
    m = KEY_RE.match(key)
    if m is None:
        raise ValueError(f"adapter key {key!r} is not of the form 'layer.{{i}}.{{module}}'")
    return ("layers", int(m.group(1)), m.group(2), "kernel")


def merge_lora_into_base(model_or_state, lora: LoraTree, masks: MaskTree | None = None, *,
                         scale) -> Any:
    """Fold ``delta_w = scale * a diag(mask*e) b`` into the base kernels (export / eval).

    Args:
      model_or_state: an NNX model (a new model is returned, the input is untouched) or an
        ``nnx.State`` of the base (a new ``State`` is returned).
      lora: unstacked adapter tree ``{key: LoraFactors}`` (``a [N, R]``, ``b [R, M]``).
      masks: rank masks ``[R]`` per key, or ``None`` (all ranks).
      scale: LoRA scale.

    Returns:
      The same kind of object with ``w <- w + delta_w`` (float32 math, stored in ``w.dtype``).
    """
    is_model = isinstance(model_or_state, nnx.Module)
    if is_model:
        graphdef, state = nnx.split(model_or_state)
    elif isinstance(model_or_state, nnx.State):
        state = model_or_state
    else:
        raise TypeError(f"model_or_state must be an nnx.Module or nnx.State, got "
                        f"{type(model_or_state).__name__}")
    flat = dict(nnx.to_flat_state(state))
    new_values = {}
    for key, f in lora.items():
        if not isinstance(f, LoraFactors):
            raise TypeError(f"lora[{key!r}] must be LoraFactors, got {type(f).__name__}")
        path = _kernel_path(key)
        if path not in flat:
            raise ValueError(f"lora key {key!r}: no kernel at state path {path}")
        w = flat[path][...]
        if f.a.ndim != 2 or (f.a.shape[0], f.b.shape[1]) != w.shape:
            raise ValueError(f"lora[{key!r}] a {tuple(f.a.shape)} b {tuple(f.b.shape)} does not "
                             f"fit kernel {tuple(w.shape)} (merge takes one unstacked client)")
        mask = None if masks is None else masks.get(key)
        new_values[path] = lora_lib.merge(w, f, mask, scale=scale)
    pure = nnx.to_pure_dict(state)
    for path, value in new_values.items():
        node = pure
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    new_state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new_state, pure)
    if is_model:
        return nnx.merge(graphdef, new_state)
    return new_state
