"""Fused multi-client LoRA linear: one frozen base ``W`` shared by a chunk of ``C`` clients.

For every client ``c`` (``x: [C, T, N]``, ``a: [C, N, R]``, ``b: [C, R, M]``, ``mask: [C, R]``,
``w: [N, M]``, ``T`` = flattened tokens)::

    y_c = x_c @ w + scale * ((x_c @ a_c) * mask_c) @ b_c                     # [T, M]

Two implementations with one contract:

* :func:`fused_lora_linear_reference`: the pure-jnp twin, ``jax.vmap`` of
  :func:`fedlora_jax.lora.apply` over the client axis. The DEFAULT path.
* :func:`fused_lora_linear`: a Pallas kernel. Grid ``(C, T / block_t, M / block_m)``; each
  program owns one ``[block_t, block_m]`` output tile and loops over ``N`` in ``block_n``
  slices, accumulating the base product ``x @ w`` AND the rank-``R`` projection ``x @ a`` in
  float32 from the same ``x`` slice (``x`` is read once for both paths, ``w`` is never copied
  per client). After the loop it applies ``gain = mask * scale`` and adds ``h @ b`` to the
  tile. Backward (``jax.custom_vjp``):

  - ``dx = dy @ w^T + ((dy @ b^T) * gain) @ a^T`` has the same shape as the forward, so it
    reuses the SAME kernel on ``(dy, w^T, b^T, a^T)``;
  - ``da = x^T @ ((dy @ b^T) * gain)`` and ``db = ((x @ a) * gain)^T @ dy`` are rank-``R``
    skinny reductions over ``T``: a kernel does not pay there (memory bound, XLA's fused
    einsums read ``x``/``dy`` once), so they use ``jnp.einsum`` with float32 accumulation;
  - ``w`` (frozen) and ``mask`` get NO gradient (zero cotangent). ASSUMPTION (issue 10):
    masks are not differentiated through this kernel; use the reference path if you need
    ``d/d mask``.

Lowering: on GPU the kernel is compiled with the Triton backend (selected explicitly with
``jax.experimental.pallas.triton.CompilerParams``: jax 0.10 defaults Pallas-on-GPU to Mosaic
GPU, whose ``pallas_call`` route is deprecated; this kernel is written in the Triton model:
pointer blocks, no scratch buffers, power-of-two loads). On CPU it runs in interpret mode.

On TPU, ``backend="mosaic"`` (what ``"auto"`` picks there) runs the Mosaic (TPU Pallas) twin of
this kernel, :mod:`fedlora_jax.kernels.lora_matmul_tpu`, written because the compiled reference
moves 2.3-4.5x the bytes a fused kernel must move on v5e (``benchmarks/lora_tpu_fusion.py``;
numbers in ``kernels/README.md``). The library's models call the REFERENCE path on every backend
(``lora_linear(impl="reference")``, XLA's fusions); a kernel is opt-in.

Shape rules (checked before tracing, ``ValueError`` naming the value): every block size is a
power of two >= 16 (Triton ``dot`` minimum) that divides its dimension. Non-divisible shapes are
REJECTED, not padded (tokens are already padded to a static ``T`` in this library; pad ``T`` and
mask the padding rows if needed). The rank is zero-padded internally to ``R_pad = max(16,
next_pow2(R))`` (exact: padded slots have zero factors and zero gain) and sliced back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from fedlora_jax.lora import LoraFactors, apply

Array = jax.Array

IMPLS = ("reference", "pallas")
BACKENDS = ("auto", "triton", "mosaic")
SUPPORTED_DTYPES = ("float32", "bfloat16")
MIN_BLOCK = 16  # Triton's tl.dot needs every operand dim >= 16.


class BlockConfig(NamedTuple):
    """Tile sizes and Triton launch parameters of :func:`fused_lora_linear`.

    Attributes:
      block_t: rows (tokens) per output tile.
      block_m: output features per tile.
      block_n: in-features per step of the inner K loop.
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton software-pipelining stages of the K loop (GPU only).
    """

    block_t: int
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# Frozen configs keyed by (dtype, N, M, R). NOT TUNED: no GPU measurement exists yet; these are
# the usual Triton matmul starting points for sm_90 (128 x 128 tiles, K step 64). The key is the
# forward problem; the backward dx problem looks up (dtype, M, N, R).
BLOCK_CONFIGS: dict[tuple[str, int, int, int], BlockConfig] = {
    ("bfloat16", 768, 768, 8): BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("float32", 768, 768, 8): BlockConfig(64, 128, 32, num_warps=4, num_stages=3),
    ("bfloat16", 768, 3072, 8): BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("bfloat16", 3072, 768, 8): BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
}
DEFAULT_TARGET = BlockConfig(64, 128, 64, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------- validation


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _largest_pow2_divisor(dim: int, target: int) -> int:
    """Largest power of two ``<= target`` that divides ``dim`` (1 if ``dim`` is odd)."""
    p = 1
    while p * 2 <= target and dim % (p * 2) == 0:
        p *= 2
    return p


def _pick_block(name: str, dim_name: str, dim: int, given: int | None, target: int) -> int:
    """Validate an explicit block size, or pick the default one for ``dim``."""
    if given is None:
        blk = _largest_pow2_divisor(dim, target)
        if blk < MIN_BLOCK:
            raise ValueError(
                f"{dim_name}={dim} has no power-of-two block >= {MIN_BLOCK} dividing it "
                f"(needed by the Pallas kernel); pad {dim_name} to a multiple of {MIN_BLOCK} "
                "or use impl='reference'")
        return blk
    if not isinstance(given, (int, np.integer)) or isinstance(given, bool):
        raise TypeError(f"{name} must be an int, got {given!r}")
    if not _is_pow2(int(given)) or given < MIN_BLOCK:
        raise ValueError(f"{name}={given} must be a power of two >= {MIN_BLOCK}")
    if dim % given:
        raise ValueError(f"{name}={given} does not divide {dim_name}={dim}; the Pallas kernel "
                         f"does not pad: choose a divisor or pad {dim_name}")
    return int(given)


def block_config(dtype, n: int, m: int, r: int, t: int, *, block_t: int | None = None,
                 block_m: int | None = None, block_n: int | None = None) -> BlockConfig:
    """Resolve the tile config for one problem ``[C, T, N] @ [N, M]`` with rank ``R``.

    Explicit block sizes win; missing ones come from :data:`BLOCK_CONFIGS` keyed by
    ``(dtype, N, M, R)``, else from :data:`DEFAULT_TARGET` shrunk to the largest power of two
    that divides the dimension.

    Raises:
      ValueError: a block is not a power of two >= 16 or does not divide its dimension, or a
        dimension has no valid block.
    """
    table = BLOCK_CONFIGS.get((jnp.dtype(dtype).name, int(n), int(m), int(r)), DEFAULT_TARGET)
    bt = _pick_block("block_t", "T", t, block_t, table.block_t)
    bm = _pick_block("block_m", "M", m, block_m, table.block_m)
    bn = _pick_block("block_n", "N", n, block_n, table.block_n)
    return BlockConfig(bt, bm, bn, table.num_warps, table.num_stages)


def _check_inputs(x: Array, w: Array, a: Array, b: Array, mask: Array | None) -> None:
    """Shape and dtype checks before tracing; messages name the argument and the expectation."""
    for name, arr, nd in (("x", x, 3), ("w", w, 2), ("a", a, 3), ("b", b, 3)):
        if getattr(arr, "ndim", None) != nd:
            raise ValueError(f"{name} must have {nd} dims, got shape {getattr(arr, 'shape', arr)}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating, got dtype {arr.dtype}")
    c, t, n = x.shape
    r = a.shape[-1]
    expect = {"w": (w.shape, (n, w.shape[1])), "a": (a.shape, (c, n, r)),
              "b": (b.shape, (c, r, w.shape[1]))}
    for name, (got, want) in expect.items():
        if got != want:
            raise ValueError(f"{name} has shape {got}, expected {want} "
                             f"(x [C, T, N]={x.shape}, w [N, M], a [C, N, R], b [C, R, M])")
    if mask is not None and mask.shape != (c, r):
        raise ValueError(f"mask has shape {mask.shape}, expected [C, R]={(c, r)}")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float (static), got {type(scale).__name__} "
                        f"{scale!r}; use impl='reference' for a traced scale")
    return float(scale)


# ----------------------------------------------------------------------------- reference twin


def fused_lora_linear_reference(x: Array, w: Array, a: Array, b: Array, mask: Array | None,
                                *, scale: float) -> Array:
    """Pure-jnp twin: ``jax.vmap(fedlora_jax.lora.apply)`` over the client axis.

    Args:
      x: ``[C, T, N]`` inputs (storage dtype = compute dtype, as in ``lora.apply``).
      w: ``[N, M]`` frozen base kernel shared by all clients.
      a: ``[C, N, R]``; b: ``[C, R, M]`` per-client factors.
      mask: ``[C, R]`` rank masks, or ``None`` (all ranks active).
      scale: LoRA scale (``alpha / r_max`` by convention).

    Returns:
      ``[C, T, M]`` in ``x.dtype``. Differentiable in every argument (masks included).
    """
    def one(xc, ac, bc, mc):
        return apply(xc, w, LoraFactors(ac, bc), mc, scale=scale)

    if mask is None:
        return jax.vmap(lambda xc, ac, bc: one(xc, ac, bc, None))(x, a, b)
    return jax.vmap(one)(x, a, b, mask)


# ----------------------------------------------------------------------------- Pallas kernel


def _dot(u: Array, v: Array) -> Array:
    """Tile product accumulated in float32. ``HIGHEST`` makes Triton use IEEE fp32 (not TF32)
    for float32 tiles; bfloat16 tiles use the bf16 tensor-core MMA either way."""
    return jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _fused_kernel(x_ref, w_ref, a_ref, b_ref, g_ref, o_ref, *, block_n: int, n: int):
    """One ``[block_t, block_m]`` tile of ``x @ w + ((x @ a) * g) @ b`` for one client.

    Refs (client axis squeezed): ``x [bt, N]``, ``w [N, bm]``, ``a [N, Rp]``, ``b [Rp, bm]``,
    ``g [1, Rp]`` (mask * scale, float32), ``o [bt, bm]``.
    """
    bt, bm = o_ref.shape
    rp = a_ref.shape[-1]

    def body(k, carry):
        acc, h = carry
        start = pl.multiple_of(k * block_n, block_n)
        xk = x_ref[:, pl.ds(start, block_n)]
        acc = acc + _dot(xk, w_ref[pl.ds(start, block_n), :])
        h = h + _dot(xk, a_ref[pl.ds(start, block_n), :])
        return acc, h

    init = (jnp.zeros((bt, bm), jnp.float32), jnp.zeros((bt, rp), jnp.float32))
    acc, h = jax.lax.fori_loop(0, n // block_n, body, init)
    h = (h * g_ref[...]).astype(b_ref.dtype)
    acc = acc + _dot(h, b_ref[...])
    o_ref[...] = acc.astype(o_ref.dtype)


def _fused_call(x: Array, w: Array, a: Array, b: Array, g: Array, cfg: BlockConfig,
                interpret: bool) -> Array:
    """``pallas_call`` on prepared inputs: ``a [C, N, Rp]``, ``b [C, Rp, M]``, ``g [C, 1, Rp]``."""
    c, t, n = x.shape
    m = w.shape[1]
    rp = a.shape[-1]
    sq = pl.squeezed
    grid = (c, t // cfg.block_t, m // cfg.block_m)
    in_specs = [
        pl.BlockSpec((sq, cfg.block_t, n), lambda ci, ti, mi: (ci, ti, 0)),
        pl.BlockSpec((n, cfg.block_m), lambda ci, ti, mi: (0, mi)),
        pl.BlockSpec((sq, n, rp), lambda ci, ti, mi: (ci, 0, 0)),
        pl.BlockSpec((sq, rp, cfg.block_m), lambda ci, ti, mi: (ci, 0, mi)),
        pl.BlockSpec((sq, 1, rp), lambda ci, ti, mi: (ci, 0, 0)),
    ]
    out_spec = pl.BlockSpec((sq, cfg.block_t, cfg.block_m), lambda ci, ti, mi: (ci, ti, mi))
    kernel = functools.partial(_fused_kernel, block_n=cfg.block_n, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((c, t, m), x.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        name="fused_lora_linear",
    )(x, w, a, b, g)


def padded_rank(r: int) -> int:
    """Rank the kernel computes with: ``max(16, next_pow2(R))`` (Triton dot minimum)."""
    return max(MIN_BLOCK, int(pl.next_power_of_2(int(r))))


def _pad_rank(a: Array, b: Array, g: Array) -> tuple[Array, Array, Array]:
    """Zero-pad ``a [C, N, R]``, ``b [C, R, M]``, ``g [C, R]`` to ``R_pad``; ``g -> [C, 1, Rp]``."""
    r = a.shape[-1]
    extra = padded_rank(r) - r
    a = jnp.pad(a, ((0, 0), (0, 0), (0, extra)))
    b = jnp.pad(b, ((0, 0), (0, extra), (0, 0)))
    g = jnp.pad(g, ((0, 0), (0, extra)))[:, None, :]
    return a, b, g


class _Static(NamedTuple):
    """Hashable static arguments of the custom_vjp (``nondiff_argnums``)."""

    scale: float
    fwd: BlockConfig
    bwd: BlockConfig
    interpret: bool


def _gain(mask: Array, scale: float) -> Array:
    return mask.astype(jnp.float32) * scale


def _forward(static: _Static, x, w, a, b, mask):
    ap, bp, gp = _pad_rank(a, b, _gain(mask, static.scale))
    return _fused_call(x, w, ap, bp, gp, static.fwd, static.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_lora(static: _Static, x, w, a, b, mask):
    return _forward(static, x, w, a, b, mask)


def _fused_lora_fwd(static: _Static, x, w, a, b, mask):
    return _forward(static, x, w, a, b, mask), (x, w, a, b, mask)


def _fused_lora_bwd(static: _Static, res, dy):
    """Cotangents for ``(x, w, a, b, mask)``; ``w`` and ``mask`` get ``None`` (zero)."""
    x, w, a, b, mask = res
    g = _gain(mask, static.scale)                                             # [C, R] f32
    # dx = dy @ w^T + ((dy @ b^T) * g) @ a^T: the forward kernel on the transposed operands.
    bt_p, at_p, gp = _pad_rank(jnp.swapaxes(b, 1, 2), jnp.swapaxes(a, 1, 2), g)
    dx = _fused_call(dy, w.T, bt_p, at_p, gp, static.bwd, static.interpret)
    # Rank-R reductions over T: XLA einsums (a kernel does not pay), f32 accumulation.
    f32 = jnp.float32
    dyb = jnp.einsum("ctm,crm->ctr", dy, b, preferred_element_type=f32) * g[:, None, :]
    xa = jnp.einsum("ctn,cnr->ctr", x, a, preferred_element_type=f32) * g[:, None, :]
    da = jnp.einsum("ctn,ctr->cnr", x, dyb.astype(x.dtype), preferred_element_type=f32)
    db = jnp.einsum("ctr,ctm->crm", xa.astype(dy.dtype), dy, preferred_element_type=f32)
    return dx, None, da.astype(a.dtype), db.astype(b.dtype), None


_fused_lora.defvjp(_fused_lora_fwd, _fused_lora_bwd)


def _resolve_backend(backend: str) -> str:
    """``"triton"`` or ``"mosaic"``: ``"auto"`` is Mosaic on TPU, Triton elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (Mosaic GPU is not "
                         "implemented: pl.pallas_call for Mosaic GPU is deprecated in jax 0.10)")
    if backend == "auto":
        return "mosaic" if jax.default_backend() == "tpu" else "triton"
    return backend


def _resolve_interpret(interpret: bool | None, backend: str) -> bool:
    """Interpret mode unless the backend's compiler is there (Triton: a GPU; Mosaic: a TPU)."""
    platform = jax.default_backend()
    if backend == "mosaic":
        if interpret is None:
            interpret = platform != "tpu"
        if not interpret and platform != "tpu":
            raise ValueError(f"the compiled Mosaic kernel needs a TPU, but the default backend is {platform!r}; "
                             "pass interpret=True or use impl='reference'")
        return bool(interpret)
    if interpret is None:
        interpret = platform != "gpu"
    if not interpret and platform != "gpu":
        raise ValueError(f"the compiled Triton kernel needs a GPU, but the default "
                         f"backend is {platform!r}; pass interpret=True or use impl='reference'")
    return bool(interpret)


def fused_lora_linear(x: Array, w: Array, a: Array, b: Array, mask: Array | None, *,
                      scale: float, block_t: int | None = None, block_m: int | None = None,
                      block_n: int | None = None, interpret: bool | None = None,
                      backend: str = "auto") -> Array:
    """Pallas fused multi-client LoRA linear; same contract as the reference twin.

    Args:
      x: ``[C, T, N]`` inputs, float32 or bfloat16 (``w``, ``a``, ``b`` are cast to it).
      w: ``[N, M]`` frozen base kernel (no gradient: its cotangent is zero).
      a: ``[C, N, R]``; b: ``[C, R, M]`` per-client factors (differentiable).
      mask: ``[C, R]`` rank masks, or ``None`` (all ranks). No gradient (zero cotangent).
      scale: static Python float, LoRA scale.
      block_t, block_m, block_n: tile sizes (powers of two >= 16 dividing ``T``, ``M``, ``N``);
        ``None`` takes them from :data:`BLOCK_CONFIGS` / the default (see :func:`block_config`).
        The backward ``dx`` kernel keeps ``block_t`` and resolves its own ``block_m``/``block_n``
        for the transposed problem ``(dtype, M, N, R)``.
      interpret: ``None`` = interpret mode unless the backend's compiler is present (a GPU for
        Triton, a TPU for Mosaic).
      backend: ``"triton"``, ``"mosaic"`` (:func:`fedlora_jax.kernels.lora_matmul_tpu.fused_lora_linear_tpu`:
        ``block_n`` does not apply, the contraction is never split) or ``"auto"`` (Mosaic on
        TPU, Triton elsewhere).

    Returns:
      ``[C, T, M]`` in ``x.dtype``; products accumulate in float32.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, block sizes, or no GPU with
        ``interpret=False``.
    """
    _check_inputs(x, w, a, b, mask)
    scale = _check_scale(scale)
    if jnp.dtype(x.dtype).name not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    backend = _resolve_backend(backend)
    interpret = _resolve_interpret(interpret, backend)
    if backend == "mosaic":
        if block_n is not None:
            raise ValueError("block_n does not apply to backend='mosaic' (its blocks hold the whole contraction)")
        from fedlora_jax.kernels.lora_matmul_tpu import fused_lora_linear_tpu

        return fused_lora_linear_tpu(x, w, a, b, mask, scale=scale, block_t=block_t, block_m=block_m,
                                     interpret=interpret)
    _, t, n = x.shape
    m, r = w.shape[1], a.shape[-1]
    fwd = block_config(x.dtype, n, m, r, t, block_t=block_t, block_m=block_m, block_n=block_n)
    bwd = block_config(x.dtype, m, n, r, t, block_t=fwd.block_t)
    cd = x.dtype
    if mask is None:
        mask = jnp.ones((x.shape[0], r), jnp.float32)
    static = _Static(scale, fwd, bwd, interpret)
    return _fused_lora(static, x, w.astype(cd), a.astype(cd), b.astype(cd), mask)


# ----------------------------------------------------------------------------- switch


def lora_linear(x: Array, w: Array, a: Array, b: Array, mask: Array | None, *, scale: float,
                impl: str = "reference") -> Array:
    """Multi-client LoRA linear with an implementation switch; ``"reference"`` is the default.

    Args:
      x: ``[C, ..., N]`` inputs (leading token dims are flattened to ``T`` and restored).
      w: ``[N, M]``; a: ``[C, N, R]``; b: ``[C, R, M]``; mask: ``[C, R]`` or ``None``.
      scale: LoRA scale.
      impl: ``"reference"`` (jnp twin, differentiable everywhere) or ``"pallas"`` (the
        fused kernel with default blocks, ``backend="auto"``: Mosaic on TPU, Triton elsewhere;
        OFF by default: see ``kernels/README.md`` for where each one pays).

    Returns:
      ``[C, ..., M]`` in ``x.dtype``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"x must be [C, ..., N], got shape {getattr(x, 'shape', x)}")
    lead = x.shape[1:-1]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    if impl == "reference":
        y = fused_lora_linear_reference(x3, w, a, b, mask, scale=scale)
    else:
        y = fused_lora_linear(x3, w, a, b, mask, scale=scale)
    return y.reshape(x.shape[0], *lead, y.shape[-1])
