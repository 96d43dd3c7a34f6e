"""Partitioners: disjoint covers, sizes, label skew, determinism, errors, summaries."""

import numpy as np
import pytest

from fedlora_jax.data import (
    dirichlet_partition,
    iid_partition,
    partition_summary,
    partition_table,
    power_law_sizes,
    quantity_skew_partition,
    shard_partition,
    validate_partition,
)


def _labels(n=400, k=4, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int32)


def _assert_cover(parts, n, num_clients):
    assert len(parts) == num_clients
    assert sum(len(p) for p in parts) == n
    allidx = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # disjoint + cover
    assert all(len(p) >= 1 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    validate_partition(parts, n)


ALL = {
    "iid": lambda labels, c, seed: iid_partition(len(labels), c, seed=seed),
    "dirichlet": lambda labels, c, seed: dirichlet_partition(labels, c, alpha=0.5, seed=seed),
    "shard": lambda labels, c, seed: shard_partition(labels, c, shards_per_client=2, seed=seed),
    "quantity": lambda labels, c, seed: quantity_skew_partition(len(labels), c, power=1.2, seed=seed),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("num_clients", [1, 7, 20])
def test_partitions_are_disjoint_covers(name, num_clients):
    labels = _labels(403)
    _assert_cover(ALL[name](labels, num_clients, 3), 403, num_clients)


@pytest.mark.parametrize("name", sorted(ALL))
def test_partitions_deterministic_from_seed(name):
    labels = _labels(300)
    a, b, c = ALL[name](labels, 6, 11), ALL[name](labels, 6, 11), ALL[name](labels, 6, 12)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c, strict=True))


def test_iid_sizes_balanced():
    sizes = [len(p) for p in iid_partition(103, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_tiny_alpha_gives_one_label_per_client():
    labels = np.repeat(np.arange(4), 250)
    parts = dirichlet_partition(labels, 4, alpha=1e-3, seed=0)
    _assert_cover(parts, 1000, 4)
    for p in parts:
        hist = np.bincount(labels[p], minlength=4)
        assert hist.max() / hist.sum() > 0.95
    # Each class lands essentially on a single client.
    dominant = [np.bincount(labels[p], minlength=4).argmax() for p in parts]
    assert sorted(dominant) == [0, 1, 2, 3]


def test_dirichlet_large_alpha_close_to_iid():
    labels = np.repeat(np.arange(4), 500)
    parts = dirichlet_partition(labels, 4, alpha=1e4, seed=0)
    for p in parts:
        frac = np.bincount(labels[p], minlength=4) / len(p)
        np.testing.assert_allclose(frac, 0.25, atol=0.05)


def test_dirichlet_matches_loop_reference():
    """Same rng stream, written as a plain loop: cut points floor(cumsum(p) * n_k)."""
    labels = _labels(200, k=3, seed=5)
    parts = dirichlet_partition(labels, 5, alpha=0.7, seed=9, min_size=1)
    rng = np.random.default_rng(9)
    while True:
        buckets = [[] for _ in range(5)]
        for k in range(3):
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet([0.7] * 5)
            start = 0
            for c in range(5):
                stop = idx.size if c == 4 else int(np.cumsum(p)[c] * idx.size)
                buckets[c].extend(idx[start:stop].tolist())
                start = stop
        if min(len(b) for b in buckets) >= 1:
            break
    for got, ref in zip(parts, buckets, strict=True):
        np.testing.assert_array_equal(got, np.sort(ref))


def test_dirichlet_min_size_respected():
    labels = _labels(500)
    parts = dirichlet_partition(labels, 10, alpha=0.3, seed=1, min_size=10)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_errors():
    labels = _labels(50)
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            dirichlet_partition(labels, 3, alpha=alpha, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(labels, 51, alpha=1.0, seed=0)
    # 10 clients but 2 classes and alpha -> 0: most clients stay empty on every draw.
    with pytest.raises(ValueError, match="tries"):
        dirichlet_partition(np.repeat([0, 1], 50), 10, alpha=1e-4, seed=0, max_tries=20)


def test_too_many_clients_errors():
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        quantity_skew_partition(5, 6, power=1.0, seed=0)
    with pytest.raises(ValueError, match="shards"):
        shard_partition(_labels(10), 4, shards_per_client=3, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(5, 0, seed=0)
    with pytest.raises(TypeError, match="num_clients"):
        iid_partition(5, 2.0, seed=0)


def test_shard_partition_few_labels_per_client():
    labels = np.repeat(np.arange(10), 100)
    parts = shard_partition(labels, 10, shards_per_client=2, seed=0)
    _assert_cover(parts, 1000, 10)
    for p in parts:
        assert len(p) == 100
        assert np.unique(labels[p]).size <= 2


def test_power_law_sizes():
    sizes = power_law_sizes(1000, 8, power=1.0, seed=0)
    assert sizes.sum() == 1000 and sizes.min() >= 1
    # Reference: weights 1/(rank+1) over a permutation of ranks.
    ranks = np.random.default_rng(0).permutation(8)
    expected = (ranks + 1.0) ** -1.0
    expected = expected / expected.sum() * (1000 - 8) + 1
    np.testing.assert_allclose(sizes, expected, atol=1.0)
    np.testing.assert_array_equal(power_law_sizes(80, 8, power=0.0, seed=3), np.full(8, 10))
    tiny = power_law_sizes(10, 10, power=5.0, seed=0)
    np.testing.assert_array_equal(tiny, np.ones(10))
    with pytest.raises(ValueError, match="power"):
        power_law_sizes(10, 2, power=-1.0, seed=0)


def test_validate_partition_errors():
    with pytest.raises(ValueError, match="empty"):
        validate_partition([np.array([0, 1]), np.array([], np.int64)], 2)
    with pytest.raises(ValueError, match="overlap"):
        validate_partition([np.array([0, 1]), np.array([1])], 2)
    with pytest.raises(ValueError, match="cover"):
        validate_partition([np.array([0])], 2)
    with pytest.raises(ValueError, match="range"):
        validate_partition([np.array([0, 5])], 2)


def test_partition_summary_and_table():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    summary = partition_summary(parts, labels, 3)
    assert summary == [
        {"client": 0, "size": 2, "label_hist": [1, 1, 0]},
        {"client": 1, "size": 4, "label_hist": [1, 0, 3]},
    ]
    table = partition_table(parts, labels, 3, label_names=["a", "b", "c"])
    lines = table.splitlines()
    assert lines[0].split() == ["client", "size", "a", "b", "c"]
    assert lines[3].split() == ["1", "4", "1", "0", "3"]
    assert "2 clients, 6 examples" in table


def test_dirichlet_per_client_mode():
    labels = np.repeat(np.arange(4), 250)
    # 40 clients, 4 classes, tiny alpha: per_class cannot fill every client; per_client can.
    parts = dirichlet_partition(labels, 40, alpha=1e-3, seed=0, mode="per_client")
    _assert_cover(parts, 1000, 40)
    assert {len(p) for p in parts} == {25}
    purity = [np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(purity) > 0.9
    again = dirichlet_partition(labels, 40, alpha=1e-3, seed=0, mode="per_client")
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    big = np.repeat(np.arange(4), 2500)
    iidish = dirichlet_partition(big, 4, alpha=1e4, seed=0, mode="per_client")
    for p in iidish:
        np.testing.assert_allclose(np.bincount(big[p], minlength=4) / len(p), 0.25, atol=0.05)
    with pytest.raises(ValueError, match="mode"):
        dirichlet_partition(labels, 4, alpha=1.0, seed=0, mode="bogus")
