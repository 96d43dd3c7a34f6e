"""LEGEND configurator: ramps, capacity EMA, and the LCD plan's four properties."""

import itertools

import numpy as np
import pytest

from fedlora_jax import devices as dv
from fedlora_jax.algorithms import legend as lg

SHAPE = dv.ModelShape(num_layers=6, hidden=64, intermediate=256, heads=4, vocab=1000, seq_len=32,
                      modules={"query": (64, 64), "value": (64, 64)})
KW = dict(r_min=2, r_max=8, batch=8, steps=5)


def _est(name, flops, mem=1e12, up=20e6, down=50e6):
    return lg.CapacityEstimate(name, flops, up, down, mem)


def test_depth_mask():
    np.testing.assert_array_equal(lg.depth_mask(5, 2), [False, False, False, True, True])
    assert not lg.depth_mask(3, 0).any() and lg.depth_mask(3, 3).all()
    with pytest.raises(ValueError, match="depth"):
        lg.depth_mask(3, 4)


def test_rank_ramp_properties_and_known_configs():
    # The third-party LEGEND configs (team1-fl-rhla): top 6 / 12 of 12 layers, ending at 28.
    np.testing.assert_array_equal(lg.rank_ramp(12, 6, 153, 4, 28)[6:], np.arange(23, 29))
    np.testing.assert_array_equal(lg.rank_ramp(12, 12, 270, 4, 28), np.arange(17, 29))
    for L, r_min, r_max, slope in itertools.product((1, 4, 7), (1, 3), (3, 8), (0, 1, 2)):
        for d in range(L + 1):
            for budget in range(0, d * r_max + 3):
                r = lg.rank_ramp(L, d, budget, r_min, r_max, slope=slope)
                assert np.all(np.diff(r[L - d:]) >= 0), (L, d, budget, r)
                assert np.all(r[: L - d] == 0)
                assert np.all((r[L - d:] >= r_min) & (r[L - d:] <= r_max))
                assert r.sum() == (np.clip(budget, d * r_min, d * r_max) if d else 0)
    with pytest.raises(ValueError, match="r_min"):
        lg.rank_ramp(4, 2, 8, 0, 4)


def test_capacity_ema():
    e = _est("x", 100.0, up=10.0, down=10.0)
    m = lg.Measurement(flops=400.0, compute_s=2.0, bytes_up=5.0, up_s=1.0)
    new = lg.update_estimate(e, m, rho=0.8)
    assert new.flops_per_s == pytest.approx(0.8 * 100 + 0.2 * 200)
    assert new.uplink_bps == pytest.approx(0.8 * 10 + 0.2 * 40)
    assert new.downlink_bps == 10.0  # nothing measured: unchanged
    with pytest.raises(ValueError, match="rho"):
        lg.update_estimate(e, m, rho=2.0)


def test_never_exceeds_memory():
    r_min_mem = [lg.config_cost(_est("m", 1e12), SHAPE, lg.rank_ramp(6, d, 2 * d, 2, 8), d,
                                batch=8, steps=5)[1] for d in range(1, 7)]
    limit = (r_min_mem[2] + r_min_mem[3]) / 2  # 3 layers fit at r_min, 4 do not
    ests = [_est("small", 5e12, mem=limit), _est("big", 5e12)]
    for deadline in (None, 1e-3, 1.0, 100.0):
        plan = lg.lcd_plan(ests, SHAPE, deadline=deadline, **KW)
        c = plan.configs[0]
        assert c.depth <= 3 and c.memory_bytes <= limit
        t, m = lg.config_cost(ests[0], SHAPE, c.ranks, c.depth, batch=8, steps=5)
        assert m <= limit and t == pytest.approx(c.time_s)
    tiny = lg.lcd_plan([_est("none", 1e12, mem=1.0)], SHAPE, **KW).configs[0]
    assert tiny.depth == 0 and not tiny.feasible and tiny.ranks.sum() == 0


def test_meets_deadline_when_feasible_and_is_maximal():
    ests = [_est("a", 1e11), _est("b", 4e11), _est("c", 2e12)]
    t_min = [lg.config_cost(e, SHAPE, lg.rank_ramp(6, 1, 2, 2, 8), 1, batch=8, steps=5)[0]
             for e in ests]
    deadline = (t_min[0] + t_min[1]) / 2  # device a cannot make it, b and c can
    plan = lg.lcd_plan(ests, SHAPE, deadline=deadline, **KW)
    assert plan.deadline == deadline
    a, b, c = plan.configs
    assert not a.feasible and a.depth == 1
    for i, cfg in ((1, b), (2, c)):
        assert cfg.feasible and cfg.time_s <= deadline
        # Maximal: one more rank (or one more layer at r_min) breaks the deadline or r_max.
        if cfg.ranks.sum() < cfg.depth * 8:
            r = lg.rank_ramp(6, cfg.depth, int(cfg.ranks.sum()) + 1, 2, 8)
            assert lg.config_cost(ests[i], SHAPE, r, cfg.depth, batch=8, steps=5)[0] > deadline
        if cfg.depth < 6:
            d = cfg.depth + 1
            t = lg.config_cost(ests[i], SHAPE, lg.rank_ramp(6, d, 2 * d, 2, 8), d, batch=8, steps=5)[0]
            assert t > deadline


def test_weaker_devices_get_fewer_layers_and_ranks_and_determinism():
    ests = [_est(f"d{i}", f, up=u, down=2.5 * u)
            for i, (f, u) in enumerate([(4e11, 5e6), (1.6e12, 20e6), (8e11, 10e6), (3.2e12, 50e6)])]
    for deadline in (None, 0.5, 2.0):
        plan = lg.lcd_plan(ests, SHAPE, deadline=deadline, **KW)
        order = np.argsort([e.flops_per_s for e in ests])
        depths = [plan.configs[i].depth for i in order]
        sums = [int(plan.configs[i].ranks.sum()) for i in order]
        assert depths == sorted(depths) and sums == sorted(sums), (deadline, depths, sums)
        again = lg.lcd_plan(ests, SHAPE, deadline=deadline, **KW)
        assert again.deadline == plan.deadline and again.score == plan.score
        for x, y in zip(plan.configs, again.configs, strict=True):
            assert x.depth == y.depth and np.array_equal(x.ranks, y.ranks)
        perm = [2, 0, 3, 1]
        permuted = lg.lcd_plan([ests[i] for i in perm], SHAPE, deadline=deadline, **KW)
        for j, i in enumerate(perm):
            assert np.array_equal(permuted.configs[j].ranks, plan.configs[i].ranks)


def test_searched_deadline_matches_straggler_and_profiles_accepted():
    profs = [dv.get_profile("raspberry_pi_5_8gb"), dv.get_profile("jetson_agx_orin_64gb")]
    plan = lg.lcd_plan(profs, SHAPE, **KW)
    pi, orin = plan.configs
    assert pi.depth <= orin.depth and pi.ranks.sum() <= orin.ranks.sum()
    assert all(c.feasible for c in plan.configs)
    assert max(c.time_s for c in plan.configs) == pytest.approx(plan.deadline)


def test_replan_uses_measurements():
    ests = [_est("a", 1e12), _est("b", 1e12)]
    full = lg.rank_ramp(6, 6, 48, 2, 8)
    deadline = lg.config_cost(ests[0], SHAPE, full, 6, batch=8, steps=5)[0]  # exactly the full config
    plan0 = lg.lcd_plan(ests, SHAPE, deadline=deadline, **KW)
    assert all(c.depth == 6 and np.array_equal(c.ranks, full) for c in plan0.configs)
    slow = lg.Measurement(flops=1e10, compute_s=1.0)  # device a measured 100x slower
    new, plan = lg.replan(ests, [slow, None], SHAPE, deadline=deadline, **KW)
    assert new[0].flops_per_s < ests[0].flops_per_s and new[1] == ests[1]
    assert plan.configs[0].depth < plan.configs[1].depth or \
        plan.configs[0].ranks.sum() < plan.configs[1].ranks.sum()
    with pytest.raises(ValueError, match="measurements"):
        lg.replan(ests, [None], SHAPE, **KW)
