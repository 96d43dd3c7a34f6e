"""Static client batches, evaluation batches and the prefetcher."""

import threading
import time

import numpy as np
import pytest

from fedlora_jax.data import (
    ClientBatches,
    Prefetcher,
    TokenizedDataset,
    eval_batches,
    iid_partition,
    make_client_batches,
)

T = 6


def _tokenized(n=50, causal=False):
    # Row i holds the value i in every real token, so a batch tells which examples it holds.
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], T, axis=1)
    mask = np.ones((n, T), np.int32)
    mask[:, T // 2 :] = np.arange(n)[:, None] % 2  # some rows padded
    labels = ids.copy() if causal else (np.arange(n) % 3).astype(np.int32)
    return TokenizedDataset(ids, mask, labels)


def _parts():
    # Client sizes 3, 10, 37.
    perm = np.random.default_rng(0).permutation(50)
    return [np.sort(perm[:3]), np.sort(perm[3:13]), np.sort(perm[13:])]


@pytest.mark.parametrize("policy", ["epoch", "exact"])
def test_shapes_dtypes(policy):
    tok = _tokenized()
    out = make_client_batches(
        tok, _parts(), [2, 0], steps=4, batch_size=5, seed=1, round_idx=0, policy=policy
    )
    assert isinstance(out, ClientBatches)
    assert out.input_ids.shape == (2, 4, 5, T) and out.input_ids.dtype == np.int32
    assert out.attention_mask.shape == (2, 4, 5, T) and out.attention_mask.dtype == np.int32
    assert out.labels.shape == (2, 4, 5) and out.labels.dtype == np.int32
    assert out.example_mask.shape == (2, 4, 5) and out.example_mask.dtype == np.float32
    assert out.num_steps.dtype == np.int32 and out.num_examples.dtype == np.int32
    np.testing.assert_array_equal(out.num_examples, [37, 3])
    # Gathered rows agree with the ids (loop reference).
    for c in range(2):
        for s in range(4):
            for b in range(5):
                row = out.example_ids[c, s, b]
                np.testing.assert_array_equal(out.input_ids[c, s, b], tok.input_ids[row])
                np.testing.assert_array_equal(out.attention_mask[c, s, b], tok.attention_mask[row])
                assert out.labels[c, s, b] == tok.labels[row]
    parts = _parts()
    for c, cid in enumerate([2, 0]):
        assert np.isin(out.example_ids[c], parts[cid]).all()


def test_epoch_policy_wraps_and_all_valid():
    parts = _parts()
    out = make_client_batches(
        _tokenized(), parts, [0, 1, 2], steps=4, batch_size=5, seed=3, round_idx=2
    )
    np.testing.assert_array_equal(out.num_steps, [4, 4, 4])
    assert (out.example_mask == 1).all()
    # Client 0 (3 examples, 20 slots): each consecutive block of 3 is a permutation.
    flat = out.example_ids[0].reshape(-1)
    for start in range(0, 18, 3):
        assert sorted(flat[start : start + 3].tolist()) == parts[0].tolist()
    # Client 2 (37 examples >= 20 slots): no repeats.
    assert np.unique(out.example_ids[2]).size == 20


def test_exact_policy_valid_steps_and_masks():
    parts = _parts()
    out = make_client_batches(
        _tokenized(), parts, [0, 1, 2], steps=4, batch_size=5, seed=3, round_idx=2,
        policy="exact",
    )
    # ceil(n / B) capped at S: ceil(3/5)=1, ceil(10/5)=2, ceil(37/5)=8 -> 4.
    np.testing.assert_array_equal(out.num_steps, [1, 2, 4])
    np.testing.assert_array_equal(out.example_mask.sum(axis=(1, 2)), [3, 10, 20])
    for c, n in enumerate([3, 10, 37]):
        flat_mask = out.example_mask[c].reshape(-1)
        assert (flat_mask[: min(n, 20)] == 1).all() and (flat_mask[min(n, 20) :] == 0).all()
        real = out.example_ids[c].reshape(-1)[: min(n, 20)]
        assert np.unique(real).size == real.size  # one pass, no repeats among real examples
        # Steps beyond num_steps are fully masked.
        assert (out.example_mask[c, out.num_steps[c] :] == 0).all()
    assert sorted(out.example_ids[1].reshape(-1)[:10].tolist()) == parts[1].tolist()


def test_deterministic_and_resume_reproducible():
    tok, parts = _tokenized(), _parts()
    kw = dict(steps=3, batch_size=4, seed=7)
    # Uninterrupted run: rounds 0..3 with different sampled clients.
    schedule = [[0, 1], [2, 1], [1, 2], [0, 2]]
    full = [make_client_batches(tok, parts, ids, round_idx=r, **kw) for r, ids in enumerate(schedule)]
    # "Resumed" run starting at round 2 rebuilds the same batches.
    resumed = [make_client_batches(tok, parts, schedule[r], round_idx=r, **kw) for r in (2, 3)]
    for a, b in zip(full[2:], resumed, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    # A client's batches do not depend on which other clients are in the round.
    alone = make_client_batches(tok, parts, [1], round_idx=0, **kw)
    np.testing.assert_array_equal(alone.example_ids[0], full[0].example_ids[1])
    # Different rounds and seeds give different orders.
    assert not np.array_equal(full[0].example_ids[1], full[1].example_ids[1])
    other_seed = make_client_batches(tok, parts, [0, 1], round_idx=0, steps=3, batch_size=4, seed=8)
    assert not np.array_equal(other_seed.example_ids, full[0].example_ids)


def test_causal_labels_gathered():
    out = make_client_batches(_tokenized(causal=True), _parts(), [1], steps=2, batch_size=3,
                              seed=0, round_idx=0)
    assert out.labels.shape == (1, 2, 3, T)


def test_batch_errors():
    tok, parts = _tokenized(), _parts()
    kw = dict(steps=2, batch_size=2, seed=0, round_idx=0)
    with pytest.raises(ValueError, match="policy"):
        make_client_batches(tok, parts, [0], policy="bogus", **kw)
    with pytest.raises(ValueError, match="empty client"):
        make_client_batches(tok, [np.array([], np.int64)], [0], **kw)
    with pytest.raises(ValueError, match="client_ids"):
        make_client_batches(tok, parts, [3], **kw)
    with pytest.raises(ValueError, match="steps"):
        make_client_batches(tok, parts, [0], steps=0, batch_size=2, seed=0, round_idx=0)
    with pytest.raises(ValueError, match="round_idx"):
        make_client_batches(tok, parts, [0], steps=1, batch_size=2, seed=0, round_idx=-1)


def test_with_iid_partition_end_to_end():
    tok = _tokenized(40)
    parts = iid_partition(40, 4, seed=0)
    out = make_client_batches(tok, parts, np.arange(4), steps=2, batch_size=5, seed=0,
                              round_idx=0, policy="exact")
    # 10 examples per client, S*B = 10: exactly one pass over all 40 examples.
    assert sorted(out.example_ids.reshape(-1).tolist()) == list(range(40))
    assert (out.example_mask == 1).all()


def test_eval_batches():
    tok = _tokenized(11)
    ev = eval_batches(tok, 4)
    assert ev.input_ids.shape == (3, 4, T) and ev.labels.shape == (3, 4)
    np.testing.assert_array_equal(ev.example_mask.reshape(-1), [1] * 11 + [0])
    np.testing.assert_array_equal(ev.input_ids.reshape(-1, T)[:11], tok.input_ids)
    np.testing.assert_array_equal(ev.labels.reshape(-1)[:11], tok.labels)
    # Masked-weighted mean over batches equals the plain mean over examples.
    vals = ev.labels.astype(float)
    assert np.isclose((vals * ev.example_mask).sum() / ev.example_mask.sum(), tok.labels.mean())
    ev5 = eval_batches(tok, 4, max_examples=5)
    assert ev5.input_ids.shape == (2, 4, T) and ev5.example_mask.sum() == 5


def test_prefetcher_order_and_lookahead():
    produced = []

    def gen():
        for i in range(6):
            produced.append(i)
            yield i

    with Prefetcher(gen(), depth=2) as pf:
        time.sleep(0.2)
        # depth 2 queued + at most 1 built and waiting to be put.
        assert len(produced) <= 3
        assert list(pf) == list(range(6))
    assert not pf.alive


def test_prefetcher_transform_and_device_put():
    import jax

    items = [np.full((2,), i, np.float32) for i in range(3)]
    with Prefetcher(items, transform=lambda x: x * 2, device_put=True) as pf:
        out = list(pf)
    assert all(isinstance(o, jax.Array) for o in out)
    np.testing.assert_array_equal(np.stack(out), np.stack(items) * 2)


def test_prefetcher_reraises_exception_in_order():
    def gen():
        yield 0
        yield 1
        raise RuntimeError("boom in producer")

    pf = Prefetcher(gen())
    assert next(pf) == 0 and next(pf) == 1
    with pytest.raises(RuntimeError, match="boom in producer"):
        next(pf)
    with pytest.raises(StopIteration):
        next(pf)
    assert not pf.alive


def test_prefetcher_close_stops_infinite_producer():
    started = threading.Event()

    def forever():
        i = 0
        while True:
            started.set()
            yield i
            i += 1

    pf = Prefetcher(forever(), depth=2)
    assert next(pf) == 0 and next(pf) == 1
    started.wait(1.0)
    pf.close()
    assert not pf.alive
    with pytest.raises(StopIteration):
        next(pf)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], depth=0)
