"""Simulated true device speed (seeded, stateless random walk) and measured round times."""

import numpy as np
import pytest

from fedlora_jax import devices as dv

PROFS = [dv.get_profile(n) for n in ("jetson_agx_orin_64gb", "raspberry_pi_5_8gb", "phone_snapdragon_8_gen_2")]


def test_zero_drift_and_noise_is_exactly_one():
    ids = np.arange(7)
    for r in (0, 1, 13):
        f = dv.true_speed_factor(ids, r, seed=3)
        assert f.dtype == np.float64 and f.shape == (7,)
        np.testing.assert_array_equal(f, 1.0)


def test_deterministic_stateless_and_independent_of_other_ids():
    ids = np.array([5, 0, 3])
    a = dv.true_speed_factor(ids, 9, seed=1, drift=0.1, noise=0.05)
    np.testing.assert_array_equal(a, dv.true_speed_factor(ids, 9, seed=1, drift=0.1, noise=0.05))
    np.testing.assert_array_equal(a[[2]], dv.true_speed_factor([3], 9, seed=1, drift=0.1, noise=0.05))
    assert not np.array_equal(a, dv.true_speed_factor(ids, 9, seed=2, drift=0.1, noise=0.05))
    assert not np.array_equal(a, dv.true_speed_factor(ids, 9, seed=1, drift=0.1, noise=0.05, tag=1))
    assert np.all(a > 0)


def test_random_walk_is_a_prefix_sum_reproducible_from_any_round():
    ids = np.arange(4)
    logs = np.log(np.stack([dv.true_speed_factor(ids, r, seed=7, drift=0.2) for r in range(12)]))  # [R, C]
    np.testing.assert_array_equal(logs[0], 0.0)  # the walk starts at the nominal speed
    inc = np.diff(logs, axis=0)
    # Asking for round 11 directly (a resumed run) gives the same walk as stepping from round 0.
    np.testing.assert_allclose(np.cumsum(inc, axis=0)[-1], logs[-1], rtol=1e-12, atol=1e-12)
    # Increments do not depend on how far the walk is asked: same per-round draws.
    again = np.diff(np.log(np.stack([dv.true_speed_factor(ids, r, seed=7, drift=0.2) for r in (5, 6)])), axis=0)
    np.testing.assert_allclose(again[0], inc[5], rtol=1e-12, atol=1e-12)
    # Jitter is per round, not cumulative: log std ~ noise, walk log std ~ drift sqrt(r).
    many = np.arange(4000)
    assert np.std(np.log(dv.true_speed_factor(many, 50, seed=0, noise=0.1))) == pytest.approx(0.1, rel=0.1)
    assert np.std(np.log(dv.true_speed_factor(many, 16, seed=0, drift=0.05))) == pytest.approx(0.2, rel=0.1)


def test_true_speed_factor_validation():
    with pytest.raises(ValueError, match="ids"):
        dv.true_speed_factor([0, -1], 0, seed=0)
    with pytest.raises(ValueError, match="ids"):
        dv.true_speed_factor([0.5], 0, seed=0)
    with pytest.raises(ValueError, match="round_idx"):
        dv.true_speed_factor([0], -1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        dv.true_speed_factor([0], 0, seed=-3)
    with pytest.raises(ValueError, match="drift"):
        dv.true_speed_factor([0], 0, seed=0, drift=-0.1)
    with pytest.raises(ValueError, match="noise"):
        dv.true_speed_factor([0], 0, seed=0, noise=float("nan"))


def test_measure_round_matches_client_time_and_scales_with_factors():
    table = dv.stack_profiles(PROFS)
    ids = np.array([0, 1, 2, 1])
    devs = dv.take_devices(table, ids)
    flops = np.array([1e12, 2e11, 5e11, 1e10])
    up = np.array([1e6, 2e5, 3e5, 0.0])
    down = 2 * up
    nominal = dv.client_time(flops, up, down, devs)
    m = dv.measure_round(flops, up, down, devs, np.ones(4))
    assert m.compute_s.dtype == np.float64
    np.testing.assert_allclose(m.compute_s, nominal.compute_s, rtol=1e-6)
    np.testing.assert_allclose(m.up_s + m.down_s, nominal.comm_s, rtol=1e-6)
    np.testing.assert_allclose(m.total_s, m.compute_s + m.up_s + m.down_s)
    half = dv.measure_round(flops, up, down, devs, np.full(4, 0.5))
    np.testing.assert_allclose(half.compute_s, 2 * m.compute_s)
    np.testing.assert_allclose(half.up_s, 2 * m.up_s)
    only_compute = dv.measure_round(flops, up, down, devs, np.full(4, 0.5), link_factors=np.ones(4))
    np.testing.assert_allclose(only_compute.down_s, m.down_s)
    one = dv.measure_round(flops[:1], up[:1], down[:1], PROFS[0], 1.0)
    np.testing.assert_allclose(one.compute_s, flops[:1] / PROFS[0].sustained_flops)
    with pytest.raises(ValueError, match="factors"):
        dv.measure_round(flops, up, down, devs, np.zeros(4))
    with pytest.raises(ValueError, match="factors"):
        dv.measure_round(flops, up, down, devs, np.ones(3))
    with pytest.raises(ValueError, match="flops"):
        dv.measure_round(-flops, up, down, devs, np.ones(4))
    with pytest.raises(ValueError, match="bytes"):
        dv.measure_round(flops, -up, down, devs, np.ones(4))
