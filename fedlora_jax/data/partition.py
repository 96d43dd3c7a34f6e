"""Partition a dataset over ``C`` clients (NumPy, host side, deterministic from a seed).

Every partitioner returns ``parts``: a list of ``C`` sorted int64 index arrays that are
disjoint and together cover ``range(n)`` (``n`` examples), and no client is empty. All
randomness comes from ``np.random.default_rng(seed)``, so the same seed gives the same parts.

- :func:`iid_partition`: uniform random, sizes differ by at most one.
- :func:`dirichlet_partition`: label skew, each class split over clients by ``Dir(alpha)``
  (Hsu et al., 2019); ``alpha -> 0`` gives about one class per client.
- :func:`shard_partition`: sort by label, cut into ``C * shards_per_client`` shards, deal
  them out (McMahan et al., 2017).
- :func:`quantity_skew_partition`: power-law client sizes, labels uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_clients(n: int, num_clients: int) -> None:
    _check_int("num_clients", num_clients, 1)
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} is more than the {n} examples: some client would be empty"
        )


def _labels_1d(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be >= 0, got min {arr.min()}")
    return arr


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def validate_partition(parts: Sequence[np.ndarray], n: int, *, require_cover: bool = True) -> None:
    """Check that ``parts`` are non-empty, disjoint, in ``[0, n)`` and (optionally) cover it.

    Raises:
      ValueError: naming the first offending client.
    """
    seen = np.zeros(n, bool)
    for c, part in enumerate(parts):
        idx = np.asarray(part)
        if idx.size == 0:
            raise ValueError(f"client {c} has no examples (empty client)")
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"client {c}: indices must be a 1-D integer array, got {idx.dtype}")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"client {c}: indices out of range [0, {n})")
        if seen[idx].any() or np.unique(idx).size != idx.size:
            raise ValueError(f"client {c}: indices overlap another client's or repeat")
        seen[idx] = True
    if require_cover and not seen.all():
        raise ValueError(f"parts cover {int(seen.sum())} of {n} examples, expected all")


def iid_partition(n: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Uniform random partition of ``range(n)``; sizes differ by at most one.

    Returns:
      ``C`` sorted int64 index arrays.
    """
    n = _check_int("n", n, 1)
    _check_clients(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_clients))


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
    mode: str = "per_class",
) -> list[np.ndarray]:
    """Label-skew partition with Dirichlet(``alpha``) shares.

    ``mode="per_class"`` (default, Hsu et al. 2019): for each class ``k`` (indices
    shuffled), shares ``p ~ Dir(alpha, ..., alpha)`` over the ``C`` clients cut the class at
    ``floor(cumsum(p) * n_k)``. The whole draw is repeated until every client has
    ``>= min_size`` examples. Small ``alpha`` = strong skew (``alpha -> 0``: about one class
    per client), large ``alpha`` = close to IID.

    ``mode="per_client"``: balanced sizes (``n / C`` each, as :func:`iid_partition`); each
    client draws its class mix ``q_c ~ Dir(alpha * 1_K)`` and takes its examples class by
    class from what is left (a class that runs out is dropped from ``q_c``). Never leaves a
    client empty, so it works for ``C`` much larger than the number of classes at tiny
    ``alpha``, where ``per_class`` cannot give every client an example.

    Args:
      labels: ``[E]`` integer class ids.
      num_clients: ``C``.
      alpha: Dirichlet concentration, ``> 0``.
      seed: NumPy seed.
      min_size: the smallest client size accepted.
      max_tries: draws before giving up (``per_class``).
      mode: ``"per_class"`` or ``"per_client"`` (see above).

    Raises:
      ValueError: ``alpha <= 0``, too many clients, or no draw within ``max_tries`` gives
        every client ``min_size`` examples (raise ``alpha`` or lower ``num_clients``).
    """
    labels = _labels_1d(labels)
    n = labels.size
    _check_clients(n, num_clients)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    min_size = _check_int("min_size", min_size, 1)
    max_tries = _check_int("max_tries", max_tries, 1)
    if min_size * num_clients > n:
        raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds n={n}")
    if mode == "per_client":
        return _dirichlet_per_client(labels, num_clients, alpha=alpha, seed=seed)
    if mode != "per_class":
        raise ValueError(f"mode must be 'per_class' or 'per_client', got {mode!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    sizes = np.zeros(num_clients, np.int64)
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx_k = rng.permutation(np.flatnonzero(labels == k))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * idx_k.size).astype(np.int64)
            for c, chunk in enumerate(np.split(idx_k, cuts)):
                buckets[c].append(chunk)
        sizes = np.array([sum(ch.size for ch in b) for b in buckets])
        if sizes.min() >= min_size:
            return _finish([np.concatenate(b) for b in buckets])
    raise ValueError(
        f"dirichlet_partition: no draw in {max_tries} tries gave all {num_clients} clients "
        f">= {min_size} examples (alpha={alpha}, {classes.size} classes, n={n}; last sizes "
        f"min {sizes.min()}); raise alpha, lower num_clients or min_size, raise max_tries, "
        f"or use mode='per_client'"
    )


def _dirichlet_per_client(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in classes]
    left = np.array([len(pool) for pool in pools], np.int64)
    sizes = [len(x) for x in np.array_split(np.arange(labels.size), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(classes.size, float(alpha)))
        counts = np.zeros(classes.size, np.int64)
        need = size
        while need > 0:
            avail = left - counts
            weights = np.where(avail > 0, mix, 0.0)
            if weights.sum() <= 0:  # the client's classes ran out: draw among the rest
                weights = (avail > 0).astype(np.float64)
            draw = rng.multinomial(need, weights / weights.sum())
            take = np.minimum(draw, avail)
            counts += take
            need -= int(take.sum())
        chunk = []
        for k, cnt in enumerate(counts):
            chunk.extend(pools[k][left[k] - cnt : left[k]])
        left -= counts
        parts.append(np.asarray(chunk, np.int64))
    return _finish(parts)


def shard_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, *, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID shards: sort by label, cut ``C * shards_per_client`` shards, deal.

    Ties within a class are broken at random; shard sizes differ by at most one.

    Raises:
      ValueError: fewer examples than shards, or too many clients.
    """
    labels = _labels_1d(labels)
    n = labels.size
    _check_clients(n, num_clients)
    shards_per_client = _check_int("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"num_clients * shards_per_client = {num_shards} shards exceeds the {n} examples"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in deal])


def power_law_sizes(n: int, num_clients: int, *, power: float, seed: int) -> np.ndarray:
    """Client sizes ``[C]`` summing to ``n``, each ``>= 1``, ``size ~ rank^(-power)``.

    ASSUMPTION: Zipf-like sizes by rank: client ``c`` gets weight ``(rank_c + 1)^(-power)``
    with ranks a random permutation of ``0..C-1``; one example each first, the remaining
    ``n - C`` shared by largest remainder. ``power = 0`` is equal sizes.
    """
    n = _check_int("n", n, 1)
    _check_clients(n, num_clients)
    if not np.isfinite(power) or power < 0:
        raise ValueError(f"power must be a finite float >= 0, got {power!r}")
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(num_clients)
    weights = (ranks + 1.0) ** (-float(power))
    extra = n - num_clients
    raw = weights / weights.sum() * extra
    sizes = np.floor(raw).astype(np.int64)
    left = extra - int(sizes.sum())
    if left:
        sizes[np.argsort(-(raw - sizes), kind="stable")[:left]] += 1
    return sizes + 1


def quantity_skew_partition(
    n: int, num_clients: int, *, power: float, seed: int
) -> list[np.ndarray]:
    """Quantity skew: random examples, power-law client sizes (see :func:`power_law_sizes`).

    Raises:
      ValueError: too many clients, ``power < 0``.
    """
    sizes = power_law_sizes(n, num_clients, power=power, seed=seed)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def label_histograms(
    parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """``[K, num_classes]`` int64: each client's count of every label."""
    labels = _labels_1d(labels)
    num_classes = _check_int("num_classes", num_classes, 1)
    out = np.zeros((len(parts), num_classes), np.int64)
    for c, part in enumerate(parts):
        hist = np.bincount(labels[np.asarray(part, np.int64)], minlength=num_classes)
        if hist.size > num_classes:
            raise ValueError(f"client {c} has label {hist.size - 1} >= num_classes={num_classes}")
        out[c] = hist
    return out


def partition_summary(
    parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, num_classes: int
) -> list[dict]:
    """Per client: ``{"client", "size", "label_hist" (list of num_classes ints)}``."""
    hists = label_histograms(parts, labels, num_classes)
    return [{"client": c, "size": int(len(part)), "label_hist": hists[c].tolist()} for c, part in enumerate(parts)]


def partition_table(
    parts: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    *,
    label_names: Sequence[str] | None = None,
    max_rows: int = 50,
) -> str:
    """A plain-text table of client sizes and label histograms (first ``max_rows`` clients)."""
    summary = partition_summary(parts, labels, num_classes)
    names = [str(x) for x in (label_names or range(num_classes))]
    header = ["client", "size", *names]
    rows = [[str(s["client"]), str(s["size"]), *map(str, s["label_hist"])] for s in summary]
    shown = rows[:max_rows]
    widths = [max(len(r[i]) for r in [header, *shown]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True))
    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, shown)]
    if len(rows) > max_rows:
        lines.append(f"... ({len(rows) - max_rows} more clients)")
    sizes = np.array([s["size"] for s in summary])
    lines.append(
        f"{len(summary)} clients, {int(sizes.sum())} examples, size min/median/max "
        f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"
    )
    return "\n".join(lines)
