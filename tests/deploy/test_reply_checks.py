"""A Flower server is safe on a network: a client's reply is checked before it is aggregated.

Each kind of bad reply (wrong keys, shape, dtype, non-finite values, a mask with slots the
client was not given, an oversized payload, a claim of more examples than the server
assigned, another client's metrics) is refused by the public check
(:func:`~fedlora_jax.deploy.flower.check_reply`); a live round with five bad clients and one
honest client reports the five and equals the simulator's round over the honest one. A client
whose result is non-finite keeps its last adapter (FedSA's local ``b``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from deploy.test_flower import SEED, STEPS, assert_close, deploy_in_process, simulate  # noqa: E402
from helpers import flower_tiny  # noqa: E402

from fedlora_jax.deploy import payload as pl  # noqa: E402
from fedlora_jax.deploy.flower import ClientTrainer, FedLoraServer, check_reply  # noqa: E402


def honest_round(name="hetlora", ids=(0, 1, 2)):
    """A server configured for ``ids`` and the honest replies of those clients."""
    dep = flower_tiny.deployment(name, seed=SEED, steps=STEPS)
    server, trainer = FedLoraServer(dep), ClientTrainer(dep)
    down = server.configure(list(ids))
    replies = {cid: trainer(arrays, config)[:2] for cid, (arrays, config) in down.items()}
    return server, replies


def _flip_slot(mask: np.ndarray) -> np.ndarray:
    """The same number of slots, one of them moved onto a slot the client was not given."""
    m = mask.copy()
    given, not_given = np.flatnonzero(m), np.flatnonzero(m == 0)
    m[given[-1]], m[not_given[0]] = 0, 1
    return m


def tamper(arrays, metrics, how):
    arrays, metrics = dict(arrays), dict(metrics)
    factor = next(k for k in arrays if k.startswith("up/") and k.endswith("/a"))
    mask = factor[: -len("a")] + "mask"
    if how == "extra key":
        arrays["up/layer.0.fc/dense"] = np.zeros((1,), np.float32)
        arrays.pop("head/0")
    elif how == "missing key":
        arrays.pop(factor)
    elif how == "shape":
        arrays[factor] = np.zeros(arrays[factor].shape[:-1] + (arrays[factor].shape[-1] - 1,), np.float32)
    elif how == "dtype":
        arrays[factor] = arrays[factor].astype(np.float16)
    elif how == "non-finite":
        arrays[factor] = arrays[factor].copy()
        arrays[factor].flat[0] = np.nan
    elif how == "mask":
        arrays[mask] = _flip_slot(arrays[mask])
    elif how == "oversized":
        arrays["head/0"] = np.zeros((1 << 20,), np.float32)
    elif how == "examples":
        metrics["num-examples"] = 1e9
    elif how == "client id":
        metrics["client-id"] = metrics["client-id"] + 1
    return arrays, metrics


CASES = {"extra key": "wrong keys", "missing key": "wrong keys", "shape": "shape", "dtype": "dtype",
         "non-finite": "non-finite", "mask": "not given", "oversized": "oversized", "examples": "the server assigned",
         "client id": "metrics of client"}


def test_check_reply_refuses_each_bad_reply():
    server, replies = honest_round()
    for cid, (arrays, metrics) in replies.items():
        expected, examples = server.expected_reply(cid)
        assert check_reply(arrays, metrics, expected, cid, examples) is None
    cid = 1  # rank 2 of r_max 4: there are slots it was not given
    expected, examples = server.expected_reply(cid)
    for how, word in CASES.items():
        arrays, metrics = tamper(*replies[cid], how)
        reason = check_reply(arrays, metrics, expected, cid, examples)
        assert reason is not None and word in reason, (how, reason)


def test_payload_check_counts_bytes_before_reading():
    expected = {"up/k/mask": np.array([1, 0], np.uint8), "up/k/a": np.zeros((3, 1), np.float32)}
    assert pl.check_payload(dict(expected), expected) is None
    big = dict(expected, **{"up/k/a": np.zeros((3, 1000), np.float32)})
    assert "oversized" in pl.check_payload(big, expected)
    assert "not an array" in pl.check_payload({"up/k/mask": [1, 0]}, expected)


def test_bad_replies_are_dropped_and_reported_and_the_round_goes_on():
    """Clients 1-5 send a bad reply each; the round aggregates client 0 alone, as the simulator
    does over ``[0]``, and reports the five with their reasons."""
    ids = [0, 1, 2, 3, 4, 5]
    bad = {1: "mask", 2: "examples", 3: "non-finite", 4: "dtype", 5: "oversized"}
    dep = flower_tiny.deployment("hetlora", seed=SEED, steps=STEPS)
    server, trainer = FedLoraServer(dep), ClientTrainer(dep)
    replies = {}
    for cid, (arrays, config) in server.configure(ids).items():
        reply = trainer(arrays, config)[:2]
        replies[cid] = tamper(*reply, bad[cid]) if cid in bad else reply
    metrics = server.aggregate(replies)
    assert metrics["num_clients"] == 1 and metrics["num_rejected"] == 5
    assert set(server.rejected) == set(bad)
    for cid, how in bad.items():
        assert CASES[how] in server.rejected[cid], (how, server.rejected[cid])
    sim = simulate("hetlora", [[0]])
    assert_close((server.state.lora, server.state.head), (sim.lora, sim.head))


def test_nonfinite_result_keeps_the_clients_local_adapter():
    """FedSA-LoRA: a client whose training diverges (a NaN in the head it received) sends a
    reply the server drops, and its cached adapter (its own ``b``) stays the last good one."""
    server, _, caches = deploy_in_process("fedsa", [[0, 2, 4]])
    trainer = ClientTrainer(server.dep)
    arrays, config = server.configure([2])[2]
    nan_head = dict(arrays, **{"head/0": np.full_like(arrays["head/0"], np.nan)})
    reply, metrics, new_cache = trainer(nan_head, config, caches[2])
    assert new_cache.lora is caches[2].lora
    expected, examples = server.expected_reply(2)
    assert "non-finite" in check_reply(reply, metrics, expected, 2, examples)
    _, _, trained = trainer(arrays, config, caches[2])  # a finite result replaces it
    assert not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(trained.lora),
                                                         jax.tree.leaves(caches[2].lora), strict=True))
