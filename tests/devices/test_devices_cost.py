"""Cost model vs hand counts and Python-loop references."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import devices as dv
from fedlora_jax import lora

TINY = dv.ModelShape(num_layers=2, hidden=4, intermediate=8, heads=2, vocab=10, seq_len=3,
                     modules={"query": (4, 4), "value": (4, 4)})


def hand_flops(ranks, cut, shape, batch, steps):
    """Matmul-by-matmul count (Python loops) of one client round."""
    T, H, F = shape.seq_len, shape.hidden, shape.intermediate
    frozen = [(H, H)] * 4 + [(H, F), (F, H)]
    mm = lambda n, m: 2 * T * n * m
    total = 0
    for l in range(shape.num_layers):
        fwd = sum(mm(n, m) for n, m in frozen) + 2 * (2 * T * T * H)
        lora_fwd = sum(mm(n, r) + mm(r, m) for r, (_, n, m) in zip(ranks[l], shape.modules, strict=True))
        total += fwd + lora_fwd
        if l >= cut:
            total += sum(mm(n, m) for n, m in frozen) + 2 * 2 * (2 * T * T * H) + 2 * lora_fwd
    head = 2 * shape.head_params
    total += head + (head if cut < shape.num_layers else 0) + head
    return total * batch * steps


def test_flops_hand_count_tiny():
    ranks = np.array([[1, 0], [2, 2]])
    assert TINY.head_params == 4 * 2 + 2
    for cut in (0, 1, 2):
        got = dv.client_flops(ranks, cut, TINY, batch=2, steps=3)
        assert float(got) == hand_flops(ranks, cut, TINY, 2, 3)
    assert float(dv.client_flops(ranks, 1, TINY, batch=2, steps=3)) == 21384.0  # worked by hand


def test_deeper_cut_fewer_flops_and_memory():
    shape = dataclasses.replace(TINY, num_layers=6)
    r = np.full((6, 2), 4)
    f = [float(dv.client_flops(r, c, shape, batch=4, steps=2)) for c in range(7)]
    m = [float(dv.client_memory(r, c, shape, batch=4)) for c in range(7)]
    assert all(a > b for a, b in zip(f, f[1:], strict=False))
    assert all(a > b for a, b in zip(m, m[1:], strict=False))


def test_pruned_module_zero_bytes_and_lora_flops():
    base = np.zeros((2, 2), int)
    assert float(dv.bytes_up(base, TINY, include_head=False)) == 0.0
    one = np.array([[0, 0], [0, 3]])
    d_flops = float(dv.client_flops(one, 0, TINY, batch=1, steps=1)
                    - dv.client_flops(base, 0, TINY, batch=1, steps=1))
    assert d_flops == 3 * (2 + 4) * 3 * (4 + 4)  # 6 T r (N+M): fwd 2x, bwd 4x
    both = np.array([[2, 0], [0, 3]])
    assert float(dv.client_flops(both, 1, TINY, batch=1, steps=1)) == float(
        dv.client_flops(one, 1, TINY, batch=1, steps=1)) + 2 * TINY.seq_len * 2 * 8  # below the cut: forward only


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bytes_equal_params_times_itemsize(dtype):
    shapes = {f"layer.{l}.{m}": (4, 4) for l in range(2) for m in ("query", "value")}
    tree = lora.init(jax.random.key(0), shapes, 5, scheme="svd_form", dtype=dtype)
    rng = np.random.default_rng(0)
    masks = {k: jnp.asarray(rng.integers(0, 2, size=(3, 5)), jnp.float32) for k in shapes}
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), tree)
    ranks = dv.ranks_from_masks(masks, TINY)
    assert ranks.shape == (3, 2, 2)
    itemsize = jnp.dtype(dtype).itemsize
    for parts in (("a", "b"), ("b",), ("a", "b", "e")):
        want = lora.count_bytes(stacked, masks, parts=parts)
        got = dv.bytes_up(ranks, TINY, parts=parts, bytes_per_param=itemsize, include_head=False)
        np.testing.assert_array_equal(got, want)
    with_head = dv.bytes_down(ranks, TINY, bytes_per_param=itemsize)
    np.testing.assert_array_equal(with_head - dv.bytes_down(ranks, TINY, bytes_per_param=itemsize,
                                                            include_head=False), 10 * itemsize)


def test_ranks_from_masks_errors_and_missing():
    r = dv.ranks_from_masks({"layer.1.value": jnp.array([1.0, 1, 0])}, TINY)
    np.testing.assert_array_equal(r, [[0, 0], [0, 2]])
    with pytest.raises(ValueError, match="do not match"):
        dv.ranks_from_masks({"layer.9.query": jnp.ones(3)}, TINY)
    with pytest.raises(ValueError, match="ranks must have shape"):
        dv.client_flops(np.zeros((3, 2)), 0, TINY, batch=1, steps=1)


def test_time_energy_and_jit_table_matches_loop():
    profs = [dv.get_profile("raspberry_pi_5_8gb"), dv.get_profile("jetson_orin_nano_8gb"),
             dv.get_profile("datacenter_h100_sxm")]
    table = dv.stack_profiles(profs)
    ids = jnp.array([2, 0, 1, 0])
    rng = np.random.default_rng(0)
    ranks = jnp.asarray(rng.integers(0, 5, size=(4, 2, 2)), jnp.int32)
    cuts = jnp.array([0, 1, 2, 1])

    @jax.jit
    def f(ranks, cuts, ids):
        return dv.client_cost(ranks, cuts, TINY, dv.take_devices(table, ids), batch=2, steps=3)

    got = f(ranks, cuts, ids)
    for c in range(4):
        p = profs[int(ids[c])]
        ref = dv.client_cost(np.asarray(ranks[c]), int(cuts[c]), TINY, p, batch=2, steps=3)
        for name in ("flops", "bytes_up", "compute_s", "comm_s", "time_s", "energy_j"):
            np.testing.assert_allclose(getattr(got, name)[c], getattr(ref, name), rtol=1e-5)
        fl = hand_flops(np.asarray(ranks[c]), int(cuts[c]), TINY, 2, 3)
        comp = fl / (p.peak_flops * p.efficiency)
        comm = 8 * float(ref.bytes_up) / p.uplink_bps + 8 * float(ref.bytes_down) / p.downlink_bps
        np.testing.assert_allclose(ref.time_s, comp + comm, rtol=1e-5)
        np.testing.assert_allclose(ref.energy_j, p.power_watts * comp + p.radio_watts * comm, rtol=1e-5)
    t = dv.ClientTime(np.float32(2.0), np.float32(1.0), np.float32(3.0))
    np.testing.assert_allclose(dv.client_energy(t, profs[0], idle_s=4.0), 7 * 2 + 1.5 + 2.5 * 4)


def test_round_time_deadline():
    t = jnp.array([1.0, 5.0, 3.0, 9.0])
    s, kept = dv.round_time(t)
    assert float(s) == 9.0 and bool(kept.all())
    s, kept = dv.round_time(t, 4.0)
    assert float(s) == 4.0
    np.testing.assert_array_equal(kept, [True, False, True, False])
    s, kept = dv.round_time(t, 20.0, valid=jnp.array([True, True, True, False]))
    assert float(s) == 5.0
    s, _ = dv.round_time(np.array([1.0, 2.0]), 2.5)
    assert float(s) == 2.0


def test_memory_formula_and_fit():
    ranks = np.array([[1, 0], [2, 2]])
    got = float(dv.client_memory(ranks, 1, TINY, batch=2, weight_bytes=2, act_bytes=2,
                                 param_bytes=4, optimizer_slots=2))
    base = (10 * 4 + 3 * 4 + 2 * 128) * 2
    per_layer = 2 * 3 * 4 * (34 + 5 * 2 * 3 / 4)
    acts = 2 * per_layer + 2 * 3 * 2 * 4
    state = ((1 * 9 + 4 * 9) + 10) * 4 * 4
    np.testing.assert_allclose(got, base + acts + state, rtol=1e-6)


def test_profiles_builtin_and_json(tmp_path):
    assert {"jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb",
            "phone_snapdragon_8_gen_2", "laptop_rtx_4060", "datacenter_h100_sxm"} <= set(dv.PROFILES)
    for p in dv.PROFILES.values():
        assert 0 < p.sustained_flops < p.peak_flops
    assert dv.PROFILES["datacenter_h100_sxm"].peak_flops > dv.PROFILES["jetson_agx_orin_64gb"].peak_flops \
        > dv.PROFILES["jetson_orin_nano_8gb"].peak_flops > dv.PROFILES["raspberry_pi_5_8gb"].peak_flops
    good = [dataclasses.asdict(dv.PROFILES["raspberry_pi_5_8gb"]),
            {"name": "x", "peak_flops": 1e9, "memory_bytes": 1e9, "power_watts": 3,
             "uplink_bps": 1e6, "downlink_bps": 2e6}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    loaded = dv.load_profiles(path)
    assert loaded["raspberry_pi_5_8gb"] == dv.PROFILES["raspberry_pi_5_8gb"]
    assert loaded["x"].efficiency == 0.3 and loaded["x"].idle_watts is None
    path.write_text(json.dumps({"y": {"peak_flops": 1e9, "memory_bytes": 1e9}}))
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['power_watts', 'uplink_bps', 'downlink_bps'\]"):
        dv.load_profiles(path)
    path.write_text(json.dumps([{**good[1], "flops": 3}]))
    with pytest.raises(ValueError, match="unknown field"):
        dv.load_profiles(path)
    path.write_text("__import__('os')")
    with pytest.raises(ValueError, match="invalid JSON"):
        dv.load_profiles(path)
    with pytest.raises(ValueError, match="efficiency"):
        dv.DeviceProfile("z", 1e9, 1e9, 1, 1, 1, efficiency=1.5)
    with pytest.raises(ValueError, match="unknown device profile"):
        dv.get_profile("nope")
