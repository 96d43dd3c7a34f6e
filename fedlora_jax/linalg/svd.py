"""Truncated SVD of low-rank products ``left @ right`` without forming the dense matrix.

Generic letters in this module: the product ``P = left @ right`` has ``M`` rows and ``N``
columns, ``K`` is the inner size (``R`` for one adapter, ``C * R`` for a stacked sum), and
``r`` is the static truncation rank. For a LoRA adapter in kernel orientation
(``a: [N_in, R]``, ``b: [R, M_out]``, ``delta_w = a @ b``) call ``lowrank_svd(a, b)``: the
result's ``u`` lives on the in-features, ``vt`` on the out-features.

Method (``shared/papers/aggregation.md`` sec. 4): ``left = Q_l R_l``, ``right^T = Q_r R_r``
(reduced QR), ``core = R_l R_r^T`` (``K x K``), ``core = U_c diag(s) V_c^T``, then
``u = Q_l U_c``, ``vt = V_c^T Q_r^T``. Cost ``O((M + N) K^2 + K^3)``, never ``O(M N)``.

Conventions shared by every function here:

* Compute dtype: float64 if any input is float64, else float32 (bf16/f16 are upcast).
  Results are returned in the compute dtype; cast to a storage dtype only after truncation
  (:func:`truncate_to_factors` takes ``dtype=``).
* Singular values are sorted descending.
* Sign convention (deterministic): for every component ``i`` the entry of largest absolute
  value of the right singular vector ``vt[..., i, :]`` is positive (the first such entry on
  exact ties); ``u[..., :, i]`` is flipped with it, so ``u diag(s) vt`` is unchanged.
  Components with ``s_i = 0`` are still sign-normalised, but their vectors are arbitrary
  (any orthonormal completion), so only ``s`` and products are comparable there.
* Rank-deficient inputs (zero columns from masks, ``b = 0`` at round 0) give zero singular
  values and never NaN; nothing divides by a singular value.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SPLITS = ("b", "all_left", "sqrt", "all_right")
STACKED_METHODS = ("auto", "lowrank", "dense")


class SVDResult(NamedTuple):
    """Truncated SVD ``P ~= u @ diag(s) @ vt``.

    Attributes:
      u: ``[..., M, r]`` left singular vectors (orthonormal columns).
      s: ``[..., r]`` singular values, non-negative, sorted descending.
      vt: ``[..., r, N]`` right singular vectors (orthonormal rows); the largest-``|.|``
        entry of each row is positive (see the module docstring).
    """

    u: Array
    s: Array
    vt: Array


# ----------------------------------------------------------------------------- validation


def _compute_dtype(*arrays) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if any(a.dtype == jnp.float64 for a in arrays) else jnp.dtype(
        jnp.float32)


def _check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def _check_factors(left, right) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``left [..., M, K]``, ``right [..., K, N]``; return (batch, M, K, N)."""
    _check_float("left", left)
    _check_float("right", right)
    if left.ndim < 2:
        raise ValueError(f"left must have shape [..., M, K], got shape {left.shape}")
    if right.ndim < 2:
        raise ValueError(f"right must have shape [..., K, N], got shape {right.shape}")
    m, k = left.shape[-2:]
    k2, n = right.shape[-2:]
    if k != k2:
        raise ValueError(f"inner sizes differ: left {left.shape} has K={k}, right {right.shape} "
                         f"has K={k2} (expected left [..., M, K], right [..., K, N])")
    if min(m, k, n) < 1:
        raise ValueError(f"empty factors: left {left.shape}, right {right.shape}")
    try:
        batch = jnp.broadcast_shapes(left.shape[:-2], right.shape[:-2])
    except ValueError as err:
        raise ValueError(f"batch dims of left {left.shape[:-2]} and right {right.shape[:-2]} "
                         "do not broadcast") from err
    return tuple(batch), m, k, n


def _check_rank(rank, max_rank: int, what: str) -> int:
    if rank is None:
        return max_rank
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
        raise ValueError(f"rank must be a static Python int, got {rank!r}")
    if rank < 1 or rank > max_rank:
        raise ValueError(f"rank={rank} is out of range: expected 1 <= rank <= {max_rank} "
                         f"({what})")
    return int(rank)


def _prepare(left, right, batch):
    cd = _compute_dtype(left, right)
    left = jnp.broadcast_to(left.astype(cd), batch + left.shape[-2:])
    right = jnp.broadcast_to(right.astype(cd), batch + right.shape[-2:])
    return left, right


def _t(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


# ------------------------------------------------------------------------- sign convention


def canonicalize_signs(res: SVDResult) -> SVDResult:
    """Flip ``(u_i, vt_i)`` pairs so the largest-``|.|`` entry of each ``vt`` row is positive.

    The flip is a constant (``stop_gradient``) per component, so gradients pass through.
    """
    u, s, vt = res
    idx = jnp.argmax(jnp.abs(vt), axis=-1)
    pivot = jnp.take_along_axis(vt, idx[..., None], axis=-1)[..., 0]
    sign = jax.lax.stop_gradient(jnp.where(pivot < 0, -1.0, 1.0).astype(vt.dtype))
    return SVDResult(u * sign[..., None, :], s, vt * sign[..., :, None])


def _truncate(res: SVDResult, rank: int) -> SVDResult:
    return SVDResult(res.u[..., :rank], res.s[..., :rank], res.vt[..., :rank, :])


# ------------------------------------------------------------------------------ QR core


def _qr_core_svd(left: Array, right: Array, rank: int | None = None) -> SVDResult:
    """Thin SVD of ``left @ right`` via the QR core; the top ``rank`` (default all
    ``p = min(M, N, K)``) components are rotated back, so truncation saves that work too."""
    q_l, r_l = jnp.linalg.qr(left)            # [..., M, k1], [..., k1, K]
    q_r, r_r = jnp.linalg.qr(_t(right))       # [..., N, k2], [..., k2, K]
    core = r_l @ _t(r_r)                      # [..., k1, k2]
    u_c, s, vt_c = _truncate(SVDResult(*jnp.linalg.svd(core, full_matrices=False)),
                             min(core.shape[-2:]) if rank is None else rank)
    return canonicalize_signs(SVDResult(q_l @ u_c, s, vt_c @ _t(q_r)))


# --------------------------------------------------------------- gradient-safe SVD rule


def _default_eps(dtype) -> float:
    return float(np.sqrt(jnp.finfo(dtype).eps))


def _safe_svd_tangents(res: SVDResult, da_v: Array, dat_u: Array, eps: float):
    """Tangents ``(du, ds, dvt)`` of a thin SVD given ``dA @ V`` and ``dA^T @ U``.

    With ``dS = U^T dA V`` split into ``sym = (dS + dS^T)/2`` and ``asym = (dS - dS^T)/2``,
    the exact thin-SVD rule (``F_ij = 1/(s_j^2 - s_i^2)``) reads, for ``i != j``,

        dU = U X + (I - U U^T) dA V S^-1,   X_ij = sym_ij / (s_j - s_i) + asym_ij / (s_j + s_i)
        dV = V Y + (I - V V^T) dA^T U S^-1, Y_ij = sym_ij / (s_j - s_i) - asym_ij / (s_j + s_i)
        ds = diag(dS)

    Safe rule (``tol = eps * max(s)``): where ``|s_j - s_i| <= tol`` (repeated singular
    values) ``1/(s_j - s_i)`` is replaced by ``1/(s_j + s_i)``; every ``1/(s_j + s_i)`` and
    ``1/s_i`` whose denominator is ``<= tol`` is replaced by 0 (zero singular values). The
    replacement keeps ``X S + S Y^T = dS`` off the diagonal, so the derivative of the product
    ``U S V^T`` stays exact at repeated nonzero singular values. Both projection terms are
    kept: exact for a product of rank ``<= p`` and zero on the complete side of a dense SVD.
    """
    u, s, vt = res
    v = _t(vt)
    ds_mat = _t(u) @ da_v                                      # [..., p, p]
    ds = jnp.diagonal(ds_mat, axis1=-2, axis2=-1)
    sym, asym = 0.5 * (ds_mat + _t(ds_mat)), 0.5 * (ds_mat - _t(ds_mat))
    tol = eps * jnp.max(s, axis=-1, keepdims=True)             # [..., 1]
    off = ~jnp.eye(s.shape[-1], dtype=bool)
    diff = s[..., None, :] - s[..., :, None]                   # [i, j] = s_j - s_i
    summ = s[..., None, :] + s[..., :, None]
    p_ok = summ > tol[..., None]
    inv_p = jnp.where(p_ok & off, 1.0 / jnp.where(p_ok, summ, 1.0), 0.0)
    m_ok = jnp.abs(diff) > tol[..., None]
    inv_m = jnp.where(off, jnp.where(m_ok, 1.0 / jnp.where(m_ok, diff, 1.0), inv_p), 0.0)
    x = sym * inv_m + asym * inv_p
    y = sym * inv_m - asym * inv_p
    s_ok = s > tol
    s_inv = jnp.where(s_ok, 1.0 / jnp.where(s_ok, s, 1.0), 0.0)[..., None, :]
    du = u @ x + (da_v - u @ (_t(u) @ da_v)) * s_inv
    dv = v @ y + (dat_u - v @ (vt @ dat_u)) * s_inv
    return du, ds, _t(dv)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _safe_lowrank(left: Array, right: Array, eps: float, rank: int) -> SVDResult:
    # Without differentiation only the top ``rank`` components are rotated back.
    return _qr_core_svd(left, right, rank)


@_safe_lowrank.defjvp
def _safe_lowrank_jvp(eps, rank, primals, tangents):
    left, right = primals
    d_left, d_right = tangents
    res = _qr_core_svd(left, right)  # all p components: the rule couples kept and dropped ones
    u, _, vt = res
    v = _t(vt)
    # dA = dL R + L dR, applied to V and U without forming any M x N matrix.
    da_v = d_left @ (right @ v) + left @ (d_right @ v)
    dat_u = _t(d_right) @ (_t(left) @ u) + _t(right) @ (_t(d_left) @ u)
    du, ds, dvt = _safe_svd_tangents(res, da_v, dat_u, eps)
    return _truncate(res, rank), _truncate(SVDResult(du, ds, dvt), rank)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _safe_dense_full(x: Array, eps: float) -> SVDResult:
    return canonicalize_signs(SVDResult(*jnp.linalg.svd(x, full_matrices=False)))


@_safe_dense_full.defjvp
def _safe_dense_full_jvp(eps, primals, tangents):
    (x,), (dx,) = primals, tangents
    res = canonicalize_signs(SVDResult(*jnp.linalg.svd(x, full_matrices=False)))
    du, ds, dvt = _safe_svd_tangents(res, dx @ _t(res.vt), _t(dx) @ res.u, eps)
    return res, SVDResult(du, ds, dvt)


def svd_safe(x: Array, *, rank: int | None = None, eps: float | None = None) -> SVDResult:
    """Thin SVD of a dense ``x [..., M, N]`` whose gradients stay finite.

    Forward: ``jnp.linalg.svd(full_matrices=False)`` in float32/float64 with this module's
    sign convention. Derivative: a custom JVP (reverse mode by transposition) following the
    standard thin-SVD rule where singular values are distinct and nonzero (so it matches
    finite differences there), with this rule elsewhere (``tol = eps * max(s)``):

    * repeated values (``|s_j - s_i| <= tol``): the divergent ``1/(s_j - s_i)`` coupling is
      replaced by ``1/(s_j + s_i)``; the rotation inside the degenerate subspace is then an
      arbitrary finite choice, but the derivative of the product ``u diag(s) vt`` (and of
      ``s``) stays exact;
    * zero values (``s_i <= tol``, or ``s_i + s_j <= tol``): ``1/s`` terms are replaced by 0,
      so gradients are finite; directions that would raise the rank of the product get no
      gradient through ``u``/``vt`` (``s`` itself still gets ``u_i^T dA v_i``).

    Args:
      x: ``[..., M, N]`` floating matrix.
      rank: static number of components to keep (default ``min(M, N)``).
      eps: relative tolerance of the rule above (default: square root of the machine epsilon
        of the compute dtype, ~3.5e-4 in float32, ~1.5e-8 in float64).

    Returns:
      :class:`SVDResult` with ``u [..., M, r]``, ``s [..., r]``, ``vt [..., r, N]``.
    """
    _check_float("x", x)
    if x.ndim < 2 or min(x.shape[-2:]) < 1:
        raise ValueError(f"x must have shape [..., M, N] with M, N >= 1, got {x.shape}")
    cd = _compute_dtype(x)
    rank = _check_rank(rank, min(x.shape[-2:]), f"min(M, N) of x {x.shape}")
    eps = _default_eps(cd) if eps is None else float(eps)
    return _truncate(_safe_dense_full(x.astype(cd), eps), rank)


# ------------------------------------------------------------------------------ public API


def lowrank_svd(left: Array, right: Array, *, rank: int | None = None,
                gradient_safe: bool = False, eps: float | None = None) -> SVDResult:
    """SVD of ``left @ right`` without forming the ``M x N`` product (QR core).

    Args:
      left: ``[..., M, K]`` floating (any float dtype; computed in float32, or float64).
      right: ``[..., K, N]``; batch dims ``...`` broadcast with ``left``'s.
      rank: static number of components ``r`` to keep, ``1 <= r <= min(M, N, K)``
        (default ``min(M, N, K)``, i.e. ``K`` whenever ``K <= min(M, N)``).
      gradient_safe: use the custom derivative of :func:`svd_safe` (finite with repeated or
        zero singular values; the QR factorisations are not differentiated). The default
        differentiates through QR and SVD with JAX's own rules, which give NaN at
        rank-deficient points.
      eps: relative tolerance of the gradient-safe rule (see :func:`svd_safe`).

    Returns:
      :class:`SVDResult` ``u [..., M, r]``, ``s [..., r]``, ``vt [..., r, N]``.

    Raises:
      ValueError: mismatched shapes or ``rank`` out of range. TypeError: non-float input.
    """
    batch, m, k, n = _check_factors(left, right)
    rank = _check_rank(rank, min(m, n, k), f"min(M={m}, N={n}, K={k})")
    left, right = _prepare(left, right, batch)
    if gradient_safe:
        eps = _default_eps(left.dtype) if eps is None else float(eps)
        return _safe_lowrank(left, right, eps, rank)
    return _qr_core_svd(left, right, rank)


def dense_svd(left: Array, right: Array, *, rank: int | None = None,
              gradient_safe: bool = False, eps: float | None = None) -> SVDResult:
    """Reference: ``jnp.linalg.svd`` of the dense product ``left @ right`` (``O(M N min)``).

    Same arguments, validation, dtype rules and sign convention as :func:`lowrank_svd`.
    """
    batch, m, k, n = _check_factors(left, right)
    rank = _check_rank(rank, min(m, n, k), f"min(M={m}, N={n}, K={k})")
    left, right = _prepare(left, right, batch)
    return _dense_of_product(left @ right, rank, gradient_safe, eps)


def _dense_of_product(p: Array, rank: int, gradient_safe: bool, eps: float | None) -> SVDResult:
    if gradient_safe:
        return svd_safe(p, rank=rank, eps=eps)
    full = canonicalize_signs(SVDResult(*jnp.linalg.svd(p, full_matrices=False)))
    return _truncate(full, rank)


def stacked_factors(left: Array, right: Array, weights: Array | None = None
                    ) -> tuple[Array, Array]:
    """Stack ``C`` products into one: ``sum_c w_c left[c] @ right[c] == L @ R``.

    Args:
      left: ``[C, ..., M, K]``. right: ``[C, ..., K, N]``. weights: ``[C]`` or ``None`` (ones).

    Returns:
      ``L [..., M, C*K]`` (weights folded in here) and ``R [..., C*K, N]``, in the compute
      dtype. Column block ``c`` of ``L`` pairs with row block ``c`` of ``R``.
    """
    c, left, right, weights = _check_stacked(left, right, weights)
    return _stack(left, right, weights)


def _check_stacked(left, right, weights):
    _check_float("left", left)
    _check_float("right", right)
    if left.ndim < 3 or right.ndim < 3:
        raise ValueError(f"stacked factors need a leading client axis: left [C, ..., M, K], "
                         f"right [C, ..., K, N]; got {left.shape} and {right.shape}")
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"client axes differ: left has C={left.shape[0]}, right has "
                         f"C={right.shape[0]}")
    c = left.shape[0]
    if weights is not None:
        if not hasattr(weights, "dtype") or not (
                jnp.issubdtype(weights.dtype, jnp.floating)
                or jnp.issubdtype(weights.dtype, jnp.integer)):
            raise TypeError(f"weights must be a real array [C], got {weights!r}")
        if weights.shape != (c,):
            raise ValueError(f"weights must have shape [C]=({c},), got {weights.shape}")
    _check_factors(left, right)
    cd = _compute_dtype(left, right, *(() if weights is None else (weights,)))
    batch = jnp.broadcast_shapes(left.shape[1:-2], right.shape[1:-2])
    left = jnp.broadcast_to(left.astype(cd), (c, *batch, *left.shape[-2:]))
    right = jnp.broadcast_to(right.astype(cd), (c, *batch, *right.shape[-2:]))
    w = jnp.ones((c,), cd) if weights is None else weights.astype(cd)
    return c, left, right, w


def _stack(left: Array, right: Array, w: Array) -> tuple[Array, Array]:
    c, m, k, n = left.shape[0], left.shape[-2], left.shape[-1], right.shape[-1]
    batch = left.shape[1:-2]
    lw = left * w.reshape((c,) + (1,) * (left.ndim - 1))
    l_st = jnp.moveaxis(lw, 0, -2).reshape(batch + (m, c * k))      # [..., M, C, K]
    r_st = jnp.moveaxis(right, 0, -3).reshape(batch + (c * k, n))   # [..., C, K, N]
    return l_st, r_st


def stacked_lowrank_svd(left: Array, right: Array, weights: Array | None = None, *,
                        rank: int, method: str = "auto", gradient_safe: bool = False,
                        eps: float | None = None) -> SVDResult:
    """SVD of the weighted sum ``sum_c w_c left[c] @ right[c]`` (e.g. FlexLoRA's global dW).

    The ``C`` products are stacked into ``[..., M, C*K] @ [..., C*K, N]`` (FLoRA's stack)
    and passed to :func:`lowrank_svd`. With ``method="auto"``, when ``C*K >= min(M, N)`` the
    QR core is no cheaper than the dense product, so the dense ``[..., M, N]`` sum is formed
    and decomposed with ``jnp.linalg.svd`` instead. Both paths give the same singular values
    and (for a clear spectral gap at ``rank``) the same truncated product.

    Args:
      left: ``[C, ..., M, K]``. right: ``[C, ..., K, N]``.
      weights: ``[C]`` real weights (float or integer counts; not normalised here), default
        ones.
      rank: static ``r``, ``1 <= r <= min(M, N, C*K)``.
      method: ``"auto"`` (above), ``"lowrank"`` or ``"dense"`` to force a path.
      gradient_safe, eps: as in :func:`lowrank_svd`.

    Returns:
      :class:`SVDResult` ``u [..., M, r]``, ``s [..., r]``, ``vt [..., r, N]``.
    """
    if method not in STACKED_METHODS:
        raise ValueError(f"method must be one of {STACKED_METHODS}, got {method!r}")
    c, left, right, w = _check_stacked(left, right, weights)
    m, k, n = left.shape[-2], left.shape[-1], right.shape[-1]
    rank = _check_rank(rank, min(m, n, c * k), f"min(M={m}, N={n}, C*K={c * k})")
    use_dense = method == "dense" or (method == "auto" and c * k >= min(m, n))
    if use_dense:
        p = jnp.einsum("c,c...mk,c...kn->...mn", w, left, right)
        return _dense_of_product(p, rank, gradient_safe, eps)
    l_st, r_st = _stack(left, right, w)
    return lowrank_svd(l_st, r_st, rank=rank, gradient_safe=gradient_safe, eps=eps)


def randomized_svd(left: Array, right: Array, *, rank: int, key: Array, oversample: int = 8,
                   n_iter: int = 2) -> SVDResult:
    """Randomized SVD (Halko, Martinsson, Tropp 2011) of ``left @ right``, matmuls only.

    Range finder with ``l = min(rank + oversample, M, N)`` Gaussian probes and ``n_iter``
    QR-stabilised power iterations; every product with ``P`` is applied as
    ``left @ (right @ x)`` / ``right^T @ (left^T @ x)``, so the ``M x N`` matrix is never
    formed. Cost ``O((M + N) K l)`` per pass. A reference for large ``K``; for ``K`` small the
    exact :func:`lowrank_svd` is cheaper.

    Args:
      left: ``[..., M, K]``. right: ``[..., K, N]``.
      rank: static ``r``, ``1 <= r <= min(M, N, K)``.
      key: typed PRNG key (``jax.random.key``); one draw of ``[..., N, l]`` probes.
      oversample: extra probes (>= 0). n_iter: power iterations (>= 0).

    Returns:
      :class:`SVDResult` with this module's sign convention.
    """
    batch, m, k, n = _check_factors(left, right)
    rank = _check_rank(rank, min(m, n, k), f"min(M={m}, N={n}, K={k})")
    for name, val in (("oversample", oversample), ("n_iter", n_iter)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name} must be a static int >= 0, got {val!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"key must be a typed PRNG key from jax.random.key, got {key!r}")
    left, right = _prepare(left, right, batch)
    l = min(rank + oversample, m, n)
    omega = jax.random.normal(key, batch + (n, l), left.dtype)
    q, _ = jnp.linalg.qr(left @ (right @ omega))                   # [..., M, l]
    for _ in range(n_iter):
        z, _ = jnp.linalg.qr(_t(right) @ (_t(left) @ q))           # [..., N, l]
        q, _ = jnp.linalg.qr(left @ (right @ z))
    small = (_t(q) @ left) @ right                                  # [..., l, N]
    u_b, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return _truncate(canonicalize_signs(SVDResult(q @ u_b, s, vt)), rank)


def truncate_to_factors(res: SVDResult, rank_or_mask: int | Array, *, split: str = "b",
                        dtype=None) -> tuple[Array, Array]:
    """Turn an SVD into factors at a static width ``R`` whose product is the truncation.

    Args:
      res: :class:`SVDResult` with ``r`` components.
      rank_or_mask: a static int ``R`` (keep the top ``R``), or a mask ``[..., R]`` in
        ``{0, 1}`` (width ``R`` static; slot ``i`` keeps component ``i`` where the mask is 1;
        a prefix mask of ``t`` ones gives the best rank-``t`` approximation). The mask's
        leading dims broadcast with the result's batch dims (e.g. ``[C, R]`` masks against
        one global SVD give ``C`` clients' factors). If ``R > r`` the extra slots are zeros.
      split: where the singular values go. ``"b"`` == ``"all_left"``: ``left = u diag(s)``,
        ``right = vt`` (FlexLoRA/RB-LoRA, where the paper's ``B`` is the left factor of
        ``dW = B A``); ``"all_right"``: ``left = u``, ``right = diag(s) vt`` (in kernel
        orientation ``delta_w = a @ b`` this puts the mass in ``b``); ``"sqrt"``:
        ``sqrt(s)`` on both. ASSUMPTION (spec sec. 3.3): ``"b"`` is the default; products are
        split-independent.
      dtype: output dtype (default: the result's dtype). Cast happens after truncation.

    Returns:
      ``left [..., M, R]`` and ``right [..., R, N]``; masked-out slots are exact zeros.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    u, s, vt = res
    r = s.shape[-1]
    if isinstance(rank_or_mask, (int, np.integer)) and not isinstance(rank_or_mask, bool):
        width = int(rank_or_mask)
        if width < 1:
            raise ValueError(f"rank_or_mask as an int must be >= 1, got {width}")
        mask = None
    else:
        if not hasattr(rank_or_mask, "shape") or rank_or_mask.ndim < 1:
            raise TypeError(f"rank_or_mask must be a static int or a mask array [..., R], got "
                            f"{rank_or_mask!r}")
        mask = rank_or_mask
        width = mask.shape[-1]
    if width > r:
        pad = width - r
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
        s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)])
        vt = jnp.pad(vt, [(0, 0)] * (vt.ndim - 2) + [(0, pad), (0, 0)])
    u, s, vt = u[..., :width], s[..., :width], vt[..., :width, :]
    if split in ("b", "all_left"):
        g_left, g_right = s, jnp.ones_like(s)
    elif split == "all_right":
        g_left, g_right = jnp.ones_like(s), s
    else:
        g_left = g_right = jnp.sqrt(s)
    if mask is not None:
        mask = mask.astype(s.dtype)
        g_left, g_right = g_left * mask, g_right * mask
    left = u * g_left[..., None, :]
    right = vt * g_right[..., :, None]
    if dtype is not None:
        left, right = left.astype(dtype), right.astype(dtype)
    return left, right
