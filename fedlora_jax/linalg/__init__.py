"""Batched truncated SVD of low-rank products, for product-space aggregation.

``lowrank_svd(left, right)`` decomposes ``left @ right`` (``[..., M, K] @ [..., K, N]``)
through a QR core in ``O((M + N) K^2)`` without forming the ``M x N`` matrix;
``stacked_lowrank_svd`` does the same for a weighted sum of ``C`` clients' products
(switching to the dense sum when ``C*K >= min(M, N)``). ``dense_svd`` and ``randomized_svd``
are references; ``svd_safe`` / ``gradient_safe=True`` give finite gradients with repeated or
zero singular values; ``truncate_to_factors`` turns a result back into ``R``-wide factors.
Everything computes in float32 (float64 for float64 inputs), is jittable with a static rank,
and broadcasts over leading batch dims. Sign convention: the largest-``|.|`` entry of each
``vt`` row is positive. See ``shared/papers/aggregation.md`` sec. 4.
"""

from fedlora_jax.linalg.svd import (
    SVDResult,
    canonicalize_signs,
    dense_svd,
    lowrank_svd,
    randomized_svd,
    stacked_factors,
    stacked_lowrank_svd,
    svd_safe,
    truncate_to_factors,
)

__all__ = [
    "SVDResult",
    "canonicalize_signs",
    "dense_svd",
    "lowrank_svd",
    "randomized_svd",
    "stacked_factors",
    "stacked_lowrank_svd",
    "svd_safe",
    "truncate_to_factors",
]
