"""Fused multi-client LoRA linear for TPU: a Mosaic (TPU Pallas) kernel.

Same contract as :func:`fedlora_jax.kernels.lora_matmul.fused_lora_linear_reference`
(``x [C, T, N]``, shared frozen ``w [N, M]``, per-client ``a [C, N, R]``, ``b [C, R, M]``,
``mask [C, R]``)::

    y_c = x_c @ w + scale * ((x_c @ a_c) * mask_c) @ b_c                     # [T, M]

Why it exists (issue 31, measured with ``benchmarks/lora_tpu_fusion.py``): compiled for v5e,
XLA:TPU's version of the reference moves 2.3-4.5x the bytes a fused kernel must move (it writes
``x @ w`` to HBM and reads it back to add the LoRA term, and reads ``x`` once per path), and at
Llama-3.2-1B shapes the op is memory-bound as XLA compiles it.

Schedule. Grid ``(M / block_m, C, T / block_t)``, every axis parallel, the output-column axis
OUTERMOST. Blocks hold the whole contraction: ``x [block_t, N]``, ``w [N, block_m]``,
``a [N, R]``, ``b [R, block_m]``. Pallas TPU fetches a block only when its block index changes
between consecutive grid steps, so ``w``'s column block is fetched once and stays in VMEM while
every client's row tiles stream past it, and each ``x`` tile feeds both the base product and
the rank-``R`` projection from VMEM (``x @ w`` never goes to HBM). HBM traffic per call (exact
for this schedule, :func:`hbm_bytes`): ``|w| + (M / block_m) |x| + |y|`` plus the factors; with
``block_m = M`` (the default when ``w`` fits the VMEM budget) that is the minimum, each operand
read once. ``x @ a`` is recomputed per column block: ``R / block_m`` extra FLOPs, none at
``block_m = M``.

Backward (``jax.custom_vjp``): ``dx = dy @ w^T + ((dy @ b^T) * gain) @ a^T`` is the same kernel
reading ``w`` transposed in place (a ``[block_n, M]`` row block of ``w`` contracted on its last
axis: no ``w.T`` copy in HBM); ``da`` and ``db`` are rank-``R`` reductions over ``T`` left to
XLA's einsums with float32 accumulation; ``w`` and ``mask`` get no gradient (frozen; as in the
Triton kernel, ASSUMPTION of issue 10).

Where it runs: compiled by Mosaic only on TPU (``interpret=False``), in Pallas' interpret mode
anywhere (tests compare it with the reference on CPU, and compile it for a TPU topology from a
CPU host). The library's models call the reference path (``lora_linear(impl="reference")``):
this kernel is selected with ``impl="pallas"`` (``backend="auto"`` picks it on TPU).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

#: VMEM the kernel's double-buffered blocks may use by default (v4's 32 MiB per core is the
#: smallest of the chips in ``fedlora_jax.plan.chips``; v5e / v6e have 128 MiB).
DEFAULT_VMEM_BUDGET = 24 * 2**20
LANE = 128  # a block's last dim: a multiple of 128 or the whole array dim (Mosaic's rule)


class TpuBlocks(NamedTuple):
    """Block sizes of one call: ``block_t`` rows (tokens of one client), ``block_m`` output
    columns; the contraction ``N`` is never split."""

    block_t: int
    block_m: int


def _sublane(dtype) -> int:
    """Second-to-last block dim multiple Mosaic needs: 8 rows of 32-bit, 16 of 16-bit values."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def vmem_bytes(t_blk: int, n: int, m_blk: int, r: int, dtype) -> int:
    """VMEM of one grid step's blocks, double-buffered, plus the float32 accumulator."""
    isz = jnp.dtype(dtype).itemsize
    blocks = (t_blk * n + n * m_blk + n * r + r * m_blk + t_blk * m_blk) * isz + r * 4
    return 2 * blocks + t_blk * m_blk * 4 + t_blk * r * 4


def _divisors(dim: int, multiple: int) -> list[int]:
    """Divisors of ``dim`` that are multiples of ``multiple``, plus ``dim`` itself; descending."""
    return sorted({d for d in range(multiple, dim + 1, multiple) if dim % d == 0} | {dim}, reverse=True)


def pick_blocks(t: int, n: int, m: int, r: int, dtype, *, block_t: int | None = None,
                block_m: int | None = None, vmem_budget: int = DEFAULT_VMEM_BUDGET) -> TpuBlocks:
    """The largest blocks (``block_m`` first: it sets how often ``x`` is read) that fit
    ``vmem_budget``; explicit sizes are validated against Mosaic's tiling rules.

    Raises:
      ValueError: a block that does not divide its dim or breaks the tiling rule (``block_t``
        a multiple of 8 rows for float32 / 16 for bfloat16, ``block_m`` a multiple of 128, or
        the whole dim), or no blocks that fit the budget.
    """
    sub = _sublane(dtype)
    for name, given, dim, mult in (("block_t", block_t, t, sub), ("block_m", block_m, m, LANE)):
        if given is not None and (given <= 0 or dim % given or (given != dim and given % mult)):
            raise ValueError(f"{name}={given} must divide {dim} and be a multiple of {mult} (or equal {dim})")
    ts = [block_t] if block_t else _divisors(t, sub)
    ms = [block_m] if block_m else _divisors(m, LANE)
    for bm in ms:
        for bt in ts:
            if vmem_bytes(bt, n, bm, r, dtype) <= vmem_budget:
                return TpuBlocks(bt, bm)
    raise ValueError(f"no blocks of [T={t}, N={n}] x [N, M={m}] (rank {r}, {jnp.dtype(dtype).name}) fit "
                     f"{vmem_budget / 2**20:.0f} MiB of VMEM: the smallest need "
                     f"{vmem_bytes(ts[-1], n, ms[-1], r, dtype) / 2**20:.1f} MiB; raise vmem_budget "
                     "or use impl='reference'")


def _kernel(x_ref, w_ref, a_ref, b_ref, g_ref, o_ref, *, w_transposed: bool):
    """One ``[block_t, block_m]`` output tile of ``x @ w + ((x @ a) * g) @ b`` (one client).

    Refs (client axis squeezed): ``x [bt, N]``, ``w [N, bm]`` (or ``[bm, N]`` when
    ``w_transposed``), ``a [N, R]``, ``b [R, bm]``, ``g [1, R]`` (mask * scale, float32),
    ``o [bt, bm]``. Products accumulate in float32.
    """
    x = x_ref[...]
    contract_w = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
    acc = jax.lax.dot_general(x, w_ref[...], contract_w, preferred_element_type=jnp.float32)
    h = jnp.dot(x, a_ref[...], preferred_element_type=jnp.float32) * g_ref[...]
    acc = acc + jnp.dot(h.astype(b_ref.dtype), b_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _specs(c: int, t: int, n: int, m: int, r: int, blocks: TpuBlocks, w_transposed: bool):
    """``(grid, in_specs, out_spec)`` of the schedule in the module docstring."""
    bt, bm = blocks
    tiles = t // bt
    sq = pl.squeezed
    w_spec = (pl.BlockSpec((bm, n), lambda j, ci, ti: (j, 0)) if w_transposed
              else pl.BlockSpec((n, bm), lambda j, ci, ti: (0, j)))
    in_specs = [
        pl.BlockSpec((sq, bt, n), lambda j, ci, ti: (ci, ti, 0)),
        w_spec,
        pl.BlockSpec((sq, n, r), lambda j, ci, ti: (ci, 0, 0)),
        pl.BlockSpec((sq, r, bm), lambda j, ci, ti: (ci, 0, j)),
        pl.BlockSpec((sq, 1, r), lambda j, ci, ti: (ci, 0, 0)),
    ]
    out_spec = pl.BlockSpec((sq, bt, bm), lambda j, ci, ti: (ci, ti, j))
    return (m // bm, c, tiles), in_specs, out_spec


def hbm_bytes(c: int, t: int, n: int, m: int, r: int, dtype, blocks: TpuBlocks, *,
              w_transposed: bool = False) -> int:
    """Bytes one call moves between HBM and VMEM under its schedule: walks the grid in order and
    counts a block's bytes each time its block index changes (Pallas TPU's pipelining skips the
    copy when consecutive steps use the same block), for the inputs and the output."""
    grid, in_specs, out_spec = _specs(c, t, n, m, r, blocks, w_transposed)
    isz = jnp.dtype(dtype).itemsize
    sizes = [isz] * 4 + [4, isz]  # x, w, a, b in the compute dtype; the gain in float32; y
    total = 0
    for spec, size in zip([*in_specs, out_spec], sizes, strict=True):
        elems = math.prod(1 if d is pl.squeezed else d for d in spec.block_shape)
        last = None
        for j in range(grid[0]):
            for ci in range(grid[1]):
                for ti in range(grid[2]):
                    idx = spec.index_map(j, ci, ti)
                    if idx != last:
                        total += elems * size
                        last = idx
    return total


def _call(x: Array, w: Array, a: Array, b: Array, g: Array, blocks: TpuBlocks, *, w_transposed: bool,
          interpret: bool, vmem_limit: int) -> Array:
    """``pallas_call`` on prepared inputs (``g [C, 1, R]`` float32); ``w_transposed``: ``w`` is
    ``[M, N]`` and read as ``w^T``."""
    c, t, n = x.shape
    m = w.shape[0] if w_transposed else w.shape[1]
    r = a.shape[-1]
    grid, in_specs, out_spec = _specs(c, t, n, m, r, blocks, w_transposed)
    # x @ w, x @ a once per column block, (x a) @ b; the bytes this schedule moves
    cost = pl.CostEstimate(flops=2 * c * t * (n * m + grid[0] * n * r + r * m), transcendentals=0,
                           bytes_accessed=hbm_bytes(c, t, n, m, r, x.dtype, blocks, w_transposed=w_transposed))
    return pl.pallas_call(
        functools.partial(_kernel, w_transposed=w_transposed),
        out_shape=jax.ShapeDtypeStruct((c, t, m), x.dtype),
        grid=grid, in_specs=in_specs, out_specs=out_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=cost, interpret=interpret, name="fused_lora_linear_tpu",
    )(x, w, a, b, g)


class _Static(NamedTuple):
    """Hashable static arguments of the custom_vjp."""

    scale: float
    fwd: TpuBlocks
    bwd: TpuBlocks
    interpret: bool
    vmem_limit: int


def _gain(mask: Array, scale: float) -> Array:
    return (mask.astype(jnp.float32) * scale)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, x, w, a, b, mask):
    return _call(x, w, a, b, _gain(mask, static.scale), static.fwd, w_transposed=False,
                 interpret=static.interpret, vmem_limit=static.vmem_limit)


def _fused_fwd(static: _Static, x, w, a, b, mask):
    return _fused(static, x, w, a, b, mask), (x, w, a, b, mask)


def _fused_bwd(static: _Static, res, dy):
    """Cotangents of ``(x, w, a, b, mask)``; ``w`` and ``mask`` get ``None`` (zero)."""
    x, w, a, b, mask = res
    g = _gain(mask, static.scale)                                              # [C, 1, R]
    dx = _call(dy, w, jnp.swapaxes(b, 1, 2), jnp.swapaxes(a, 1, 2), g, static.bwd, w_transposed=True,
               interpret=static.interpret, vmem_limit=static.vmem_limit)
    f32 = jnp.float32
    dyb = jnp.einsum("ctm,crm->ctr", dy, b, preferred_element_type=f32) * g
    xa = jnp.einsum("ctn,cnr->ctr", x, a, preferred_element_type=f32) * g
    da = jnp.einsum("ctn,ctr->cnr", x, dyb.astype(x.dtype), preferred_element_type=f32)
    db = jnp.einsum("ctr,ctm->crm", xa.astype(dy.dtype), dy, preferred_element_type=f32)
    return dx, None, da.astype(a.dtype), db.astype(b.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_lora_linear_tpu(x: Array, w: Array, a: Array, b: Array, mask: Array | None, *, scale: float,
                          block_t: int | None = None, block_m: int | None = None, interpret: bool = False,
                          vmem_budget: int = DEFAULT_VMEM_BUDGET) -> Array:
    """Mosaic fused multi-client LoRA linear; the reference twin's contract.

    Args:
      x: ``[C, T, N]``, float32 or bfloat16 (``w``, ``a``, ``b`` are cast to it).
      w: ``[N, M]`` frozen base (zero cotangent). a: ``[C, N, R]``; b: ``[C, R, M]``.
      mask: ``[C, R]`` or ``None`` (all ranks); zero cotangent.
      scale: static Python float.
      block_t, block_m: block sizes (:func:`pick_blocks` validates them, or picks the largest
        that fit ``vmem_budget``); the backward ``dx`` call picks its own for ``[T, M] x [M, N]``.
      interpret: run in Pallas' interpret mode (any backend) instead of compiling with Mosaic.
      vmem_budget: bytes of VMEM the double-buffered blocks may use (also the kernel's
        ``vmem_limit_bytes``, plus 25% headroom for Mosaic's own scratch).

    Returns:
      ``[C, T, M]`` in ``x.dtype``.
    """
    from fedlora_jax.kernels.lora_matmul import SUPPORTED_DTYPES, _check_inputs, _check_scale

    _check_inputs(x, w, a, b, mask)
    scale = _check_scale(scale)
    if jnp.dtype(x.dtype).name not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    c, t, n = x.shape
    m, r = w.shape[1], a.shape[-1]
    fwd = pick_blocks(t, n, m, r, x.dtype, block_t=block_t, block_m=block_m, vmem_budget=vmem_budget)
    bwd = pick_blocks(t, m, n, r, x.dtype, block_t=fwd.block_t, vmem_budget=vmem_budget)
    if mask is None:
        mask = jnp.ones((c, r), jnp.float32)
    cd = x.dtype
    static = _Static(scale, fwd, bwd, bool(interpret), int(vmem_budget * 5 // 4))
    return _fused(static, x, w.astype(cd), a.astype(cd), b.astype(cd), mask)
