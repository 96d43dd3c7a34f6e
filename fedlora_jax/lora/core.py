"""LoRA primitives on plain pytrees: factors, masks, apply, merge, counts.

Layout (Flax kernel orientation, ``[in, out]``), for one adapted matrix ``w: [N, M]``:

    a: [N, R]    b: [R, M]    mask: [R] in {0, 1}    e: [R] (optional, SVD-form "lambda")
    delta_w = scale * a @ diag(mask * e) @ b
    y       = x @ w + scale * (((x @ a) * (mask * e)) @ b)

``R`` is the static ``r_max``; a client's rank is ``sum(mask)``. ``scale`` is always
passed explicitly. Convention used by this library: ``scale = alpha / r_max`` (one scale
for every client, so products of different-rank clients are comparable; see
``shared/papers/aggregation.md`` sec. 0.1). PEFT's ``alpha / r`` convention is converted
only at the import/export boundary (``fedlora_jax.models.peft_io``).

An adapter *tree* is ``dict[str, LoraFactors]`` keyed by module path
(e.g. ``"layer.3.attention.query"``); the matching masks are ``dict[str, Array[R]]``.
Stacking clients adds a leading ``C`` axis to every leaf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INIT_SCHEMES = ("a_random_b_zero", "b_random_a_zero", "svd_form")


class LoraFactors(NamedTuple):
    """Factors of one adapted matrix.

    Attributes:
      a: ``[..., N, R]`` down-projection (PEFT ``lora_A`` transposed).
      b: ``[..., R, M]`` up-projection (PEFT ``lora_B`` transposed).
      e: ``[..., R]`` per-rank gain (FedARA/AdaLoRA singular values ``lambda``), or ``None``
        for plain LoRA (gain 1).
    """

    a: Array
    b: Array
    e: Array | None = None


LoraTree = dict[str, LoraFactors]
MaskTree = dict[str, Array]


def _check_r_max(r_max: int) -> None:
    if not isinstance(r_max, (int, np.integer)) or isinstance(r_max, bool) or r_max < 1:
        raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")


def rank_mask(rank: int, r_max: int, dtype=jnp.float32) -> Array:
    """Prefix mask ``[R]`` with the first ``rank`` entries 1.

    Raises:
      ValueError: if ``rank`` is not in ``[0, r_max]``.
    """
    _check_r_max(r_max)
    if not isinstance(rank, (int, np.integer)) or rank < 0 or rank > r_max:
        raise ValueError(f"rank must be an int in [0, r_max={r_max}], got {rank!r}")
    return (jnp.arange(r_max) < rank).astype(dtype)


def rank_masks(ranks: Mapping[str, int] | int, shapes: Mapping[str, tuple[int, int]],
               r_max: int, dtype=jnp.float32) -> MaskTree:
    """Prefix masks for every module: one rank for all, or a rank per module name."""
    if isinstance(ranks, Mapping):
        unknown = set(ranks) - set(shapes)
        if unknown:
            raise ValueError(f"ranks given for unknown modules {sorted(unknown)}; "
                             f"known: {sorted(shapes)}")
        return {k: rank_mask(int(ranks.get(k, 0)), r_max, dtype) for k in shapes}
    return {k: rank_mask(int(ranks), r_max, dtype) for k in shapes}


def init(key: Array, shapes: Mapping[str, tuple[int, int]], r_max: int, *,
         scheme: str = "a_random_b_zero", std: float | None = None,
         dtype=jnp.float32) -> LoraTree:
    """Initialise factors for a set of target modules at a static ``r_max``.

    Args:
      key: a typed PRNG key (``jax.random.key``); split once per module in sorted order.
      shapes: ``{module_path: (N, M)}`` in/out features of each adapted matrix.
      r_max: static maximum rank ``R``.
      scheme: ``"a_random_b_zero"`` (LoRA/PEFT default: ``a ~ U(-1/sqrt(N), 1/sqrt(N))``
        like PyTorch's Kaiming-uniform with ``a=sqrt(5)``, ``b = 0``), ``"b_random_a_zero"``
        (the transposed alternative), or ``"svd_form"`` (AdaLoRA/FedARA: ``a, b ~ N(0, std^2)``
        with ``std=0.02`` default, ``e = 0``; delta starts at exactly 0).
      std: override the random factor's standard deviation (normal init) for any scheme.
      dtype: storage dtype of the factors.

    Returns:
      ``{module_path: LoraFactors}`` with ``a: [N, R]``, ``b: [R, M]``.
    """
    _check_r_max(r_max)
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    if not shapes:
        raise ValueError("shapes is empty: no target modules to adapt")
    out: LoraTree = {}
    names = sorted(shapes)
    keys = jax.random.split(key, len(names))
    for k, name in zip(keys, names, strict=True):
        n, m = shapes[name]
        if n < 1 or m < 1:
            raise ValueError(f"module {name!r} has invalid shape {(n, m)}")
        ka, kb = jax.random.split(k)
        if scheme == "svd_form":
            s = 0.02 if std is None else std
            a = s * jax.random.normal(ka, (n, r_max), jnp.float32)
            b = s * jax.random.normal(kb, (r_max, m), jnp.float32)
            out[name] = LoraFactors(a.astype(dtype), b.astype(dtype), jnp.zeros((r_max,), dtype))
            continue
        if std is None:
            bound = 1.0 / np.sqrt(n if scheme == "a_random_b_zero" else r_max)
            rand = lambda kk, shp, bound=bound: jax.random.uniform(kk, shp, jnp.float32, -bound, bound)
        else:
            rand = lambda kk, shp: std * jax.random.normal(kk, shp, jnp.float32)
        if scheme == "a_random_b_zero":
            a, b = rand(ka, (n, r_max)), jnp.zeros((r_max, m), jnp.float32)
        else:
            a, b = jnp.zeros((n, r_max), jnp.float32), rand(kb, (r_max, m))
        out[name] = LoraFactors(a.astype(dtype), b.astype(dtype), None)
    return out


def effective_gain(factors: LoraFactors, mask: Array | None) -> Array | None:
    """Per-rank gain ``mask * e`` (``[..., R]``), or ``None`` when both are absent."""
    g = factors.e
    if mask is not None:
        g = mask if g is None else g * mask
    return g


def apply(x: Array, w: Array, factors: LoraFactors, mask: Array | None = None, *,
          scale: float, bias: Array | None = None, compute_dtype=None) -> Array:
    """``y = x @ w (+ bias) + scale * (((x @ a) * mask * e) @ b)``.

    Args:
      x: ``[..., N]`` inputs (any leading batch dims).
      w: ``[N, M]`` frozen base kernel.
      factors: ``a: [N, R]``, ``b: [R, M]`` (``e: [R]`` optional).
      mask: ``[R]`` rank mask or ``None`` (all ranks active).
      scale: the LoRA scale (``alpha / r_max`` by this library's convention).
      bias: optional ``[M]``.
      compute_dtype: dtype of the matmuls (default: ``x.dtype``).

    Returns:
      ``[..., M]`` in ``compute_dtype``.
    """
    cd = x.dtype if compute_dtype is None else compute_dtype
    x = x.astype(cd)
    y = x @ w.astype(cd)
    if bias is not None:
        y = y + bias.astype(cd)
    return y + lora_delta_out(x, factors, mask, scale=scale, compute_dtype=cd)


def lora_delta_out(x: Array, factors: LoraFactors, mask: Array | None = None, *,
                   scale: float, compute_dtype=None) -> Array:
    """Only the low-rank path: ``scale * (((x @ a) * mask * e) @ b)``, ``[..., M]``."""
    cd = x.dtype if compute_dtype is None else compute_dtype
    h = x.astype(cd) @ factors.a.astype(cd)
    g = effective_gain(factors, mask)
    if g is not None:
        h = h * g.astype(cd)
    return (scale * h) @ factors.b.astype(cd)


def apply_merged(x: Array, w: Array, factors: LoraFactors, mask: Array | None = None, *,
                 scale, bias: Array | None = None) -> Array:
    """:func:`apply` computed as ``x @ (w + delta_w) (+ bias)`` in float32, with a hand-written VJP.

    Same shapes, values (up to float32 rounding) and gradients (for every input, ``w`` and
    ``bias`` included) as :func:`apply` with ``compute_dtype=float32``. The forward folds the
    rank-``R`` product into one ``[N, M]`` kernel (``2 N R M`` FLOPs, independent of the
    number of tokens) instead of two token-sized low-rank matmuls and an add; the backward
    takes ``dx = dy (w + delta_w)^T`` in one matmul and the factor gradients from ``[T, R]``
    products. The frozen kernel's gradient ``x^T dy`` is only computed where something uses it.

    float32 only: folding a small ``delta_w`` into a bfloat16 kernel would round it away, so
    half-precision callers keep :func:`apply`.

    Args:
      x: ``[..., N]`` float32; w: ``[N, M]``; factors: ``a [N, R]``, ``b [R, M]``, ``e [R]``
        optional; mask: ``[R]`` or ``None``; scale: LoRA scale; bias: ``[M]`` or ``None``.

    Returns:
      ``[..., M]`` float32.
    """
    if x.dtype != jnp.float32:
        raise TypeError(f"apply_merged computes in float32; x is {x.dtype} (use apply for half precision)")
    gain = effective_gain(factors, mask)
    r = factors.a.shape[-1]
    g = jnp.ones((r,), jnp.float32) if gain is None else gain.astype(jnp.float32)
    sg = jnp.asarray(scale, jnp.float32) * g
    f32 = lambda t: None if t is None else t.astype(jnp.float32)
    return _merged_linear(x, f32(w), f32(bias), f32(factors.a), f32(factors.b), sg)


@jax.custom_vjp
def _merged_linear(x, w, bias, a, b, sg):
    return _merged_linear_fwd(x, w, bias, a, b, sg)[0]


def _merged_linear_fwd(x, w, bias, a, b, sg):
    wc = w + (a * sg) @ b                                      # [N, M]
    y = x @ wc
    if bias is not None:
        y = y + bias
    return y, (x, wc, a, b, sg, bias)


def _merged_linear_bwd(res, dy):
    x, wc, a, b, sg, bias = res
    n, m = wc.shape
    x2, dy2 = x.reshape(-1, n), dy.reshape(-1, m)
    dx = dy @ wc.T
    dv = dy2 @ b.T                                             # [T, R]
    u = x2 @ a                                                 # [T, R]
    da = x2.T @ (dv * sg)
    db = (u * sg).T @ dy2
    dsg = jnp.sum(u * dv, axis=0)
    dw = x2.T @ dy2                                            # dropped by XLA when unused
    dbias = None if bias is None else jnp.sum(dy2, axis=0)
    return dx, dw, dbias, da, db, dsg


_merged_linear.defvjp(_merged_linear_fwd, _merged_linear_bwd)


def apply_stacked(x: Array, w: Array, factors: LoraFactors, mask: Array | None = None, *,
                  scale: float, bias: Array | None = None, compute_dtype=None) -> Array:
    """``apply`` for a stacked client axis: one shared ``w``, per-client factors.

    Shapes: ``x [C, ..., N]``, ``w [N, M]``, ``a [C, N, R]``, ``b [C, R, M]``,
    ``mask [C, R]`` -> ``[C, ..., M]``. Equals a Python loop of :func:`apply` over ``C``.
    """
    fn = lambda xc, fc, mc: apply(xc, w, fc, mc, scale=scale, bias=bias, compute_dtype=compute_dtype)
    return jax.vmap(fn)(x, factors, mask)


def delta(factors: LoraFactors, mask: Array | None = None, *, scale: float) -> Array:
    """Dense ``delta_w = scale * a @ diag(mask * e) @ b`` in float32, ``[..., N, M]``."""
    a = factors.a.astype(jnp.float32)
    g = effective_gain(factors, mask)
    if g is not None:
        a = a * g.astype(jnp.float32)[..., None, :]
    return scale * (a @ factors.b.astype(jnp.float32))


def merge(w: Array, factors: LoraFactors, mask: Array | None = None, *, scale: float) -> Array:
    """``w + delta_w``, computed in float32, returned in ``w.dtype``. Shape ``[N, M]``."""
    return (w.astype(jnp.float32) + delta(factors, mask, scale=scale)).astype(w.dtype)


def unmerge(w_merged: Array, factors: LoraFactors, mask: Array | None = None, *,
            scale: float) -> Array:
    """Inverse of :func:`merge`: ``w_merged - delta_w`` (exact up to rounding)."""
    return (w_merged.astype(jnp.float32) - delta(factors, mask, scale=scale)).astype(w_merged.dtype)


def apply_masks(tree: LoraTree, masks: MaskTree) -> LoraTree:
    """Zero the rank slots where ``mask == 0``: columns of ``a``, rows of ``b``, entries of ``e``.

    Keeps the invariant of the aggregation spec: masked-out slots are stored as exact zeros.
    ``e`` (if any) is masked too.
    """
    out = {}
    for k, f in tree.items():
        m = masks[k]
        a = f.a * m[..., None, :].astype(f.a.dtype)
        b = f.b * m[..., :, None].astype(f.b.dtype)
        e = None if f.e is None else f.e * m.astype(f.e.dtype)
        out[k] = LoraFactors(a, b, e)
    return out


# ---------------------------------------------------------------- communication counts


def count_params(tree: LoraTree, masks: MaskTree | None = None, *,
                 parts: Sequence[str] = ("a", "b", "e")) -> Array:
    """Number of parameters of the *active* ranks, ``sum_m rank_m * (N_m + M_m [+1])``.

    Args:
      tree: factors, unstacked or with leading (client) axes.
      masks: rank masks; ``None`` counts all ``R`` slots.
      parts: which factors travel: ``("a", "b")`` for LoRA, ``("b",)`` for FFA-LoRA,
        ``("a",)`` for FedSA-LoRA; ``"e"`` counts only where the factor has ``e``.

    Returns:
      Array of shape ``mask.shape[:-1]`` (e.g. ``[]`` for one client, ``[C]`` for stacked),
      int32, exact.
    """
    bad = set(parts) - {"a", "b", "e"}
    if bad:
        raise ValueError(f"parts must be a subset of ('a', 'b', 'e'), got {tuple(parts)}")
    total = 0
    for k, f in tree.items():
        n, m = f.a.shape[-2], f.b.shape[-1]
        if masks is None:
            r = jnp.full(f.a.shape[:-2], f.a.shape[-1], jnp.int32)
        else:
            r = jnp.sum(masks[k] != 0, axis=-1).astype(jnp.int32)
        per_rank = (n if "a" in parts else 0) + (m if "b" in parts else 0)
        per_rank += 1 if ("e" in parts and f.e is not None) else 0
        total = total + r * per_rank
    return jnp.asarray(total, jnp.int32)


def count_bytes(tree: LoraTree, masks: MaskTree | None = None, *,
                parts: Sequence[str] = ("a", "b", "e"), bytes_per_param: int | None = None) -> Array:
    """Bytes a client sends (or receives) for the active ranks: params x dtype size.

    ``bytes_per_param`` defaults to the itemsize of the factors' storage dtype.
    """
    if bytes_per_param is None:
        first = next(iter(tree.values()))
        bytes_per_param = jnp.dtype(first.a.dtype).itemsize
    return count_params(tree, masks, parts=parts) * bytes_per_param


def module_shapes(tree: LoraTree) -> dict[str, tuple[int, int]]:
    """``{module_path: (N, M)}`` of a (possibly stacked) tree."""
    return {k: (int(f.a.shape[-2]), int(f.b.shape[-1])) for k, f in tree.items()}


def validate(tree: LoraTree, masks: MaskTree | None = None, *, r_max: int | None = None) -> None:
    """Check factor shapes and dtypes eagerly; raise ``ValueError``/``TypeError`` naming the module."""
    for k, f in tree.items():
        if not isinstance(f, LoraFactors):
            raise TypeError(f"module {k!r}: expected LoraFactors, got {type(f).__name__}")
        for name, arr in (("a", f.a), ("b", f.b)):
            if not jnp.issubdtype(arr.dtype, jnp.floating):
                raise TypeError(f"module {k!r}: factor {name} must be floating, got {arr.dtype}")
        if f.a.shape[-1] != f.b.shape[-2] or f.a.shape[:-2] != f.b.shape[:-2]:
            raise ValueError(f"module {k!r}: a {f.a.shape} and b {f.b.shape} do not match "
                             "(expected a [..., N, R], b [..., R, M])")
        r = f.a.shape[-1]
        if r_max is not None and r != r_max:
            raise ValueError(f"module {k!r}: rank dim {r} != r_max {r_max}")
        if f.e is not None and f.e.shape != f.a.shape[:-2] + (r,):
            raise ValueError(f"module {k!r}: e has shape {f.e.shape}, expected {f.a.shape[:-2] + (r,)}")
        if masks is not None:
            if k not in masks:
                raise ValueError(f"module {k!r} has no mask; masks cover {sorted(masks)}")
            if masks[k].shape[-1] != r:
                raise ValueError(f"module {k!r}: mask has {masks[k].shape[-1]} ranks, factors have {r}")
