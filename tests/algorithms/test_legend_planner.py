"""LEGEND configurator: ramps, capacity EMA, and the LCD plan's four properties."""

import itertools

import numpy as np
import pytest

from fedlora_jax import devices as dv
from fedlora_jax.algorithms import legend_planner as lg

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


# --- The experiment's setting (experiments/configs/legend.py), built like driver/run.py::_model_shape.

MINILM = dv.ModelShape(num_layers=6, hidden=384, intermediate=1536, heads=12, vocab=30522, seq_len=32,
                       modules={"query": (384, 384), "value": (384, 384)}, num_labels=2)
MIX = ("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "phone_snapdragon_8_gen_2", "raspberry_pi_5_8gb")
EXP = dict(r_min=1, r_max=8, batch=8, steps=4)


def _profiles():
    return [dv.get_profile(n) for n in MIX]


def _assert_top_ramp(ranks, L=6):
    d = int(np.sum(ranks > 0))
    assert np.all(ranks[: L - d] == 0), ranks
    assert np.all(np.diff(ranks[L - d:]) >= 0), ranks  # non-decreasing toward the output (layer L-1)


def test_is_intermediate():
    assert not lg.is_intermediate(np.zeros(6, int), 1, 8)
    assert not lg.is_intermediate([0, 0, 0, 0, 0, 1], 1, 8)
    assert not lg.is_intermediate([8] * 6, 1, 8)
    assert not lg.is_intermediate([1] * 6, 1, 8)
    assert not lg.is_intermediate([0, 0, 0, 0, 0, 8], 1, 8)
    assert lg.is_intermediate([0, 0, 0, 0, 0, 3], 1, 8)
    assert lg.is_intermediate([0, 0, 0, 0, 8, 8], 1, 8)
    assert lg.is_intermediate([1, 1, 1, 1, 2, 3], 1, 8)


def test_minilm_searched_plan_collapses_as_documented():
    # The finding in lcd_plan's docstring: the Pi's minimal time exceeds the others' full times,
    # so the searched T* saturates the three fast devices (uniform FedIT) and the Pi gets 1 layer.
    plan = lg.lcd_plan(_profiles(), MINILM, **EXP)
    orin, nano, phone, pi = plan.configs
    for c in (orin, nano, phone):
        assert c.depth == 6 and np.all(c.ranks == 8)
    assert pi.depth == 1 and pi.ranks.sum() == 1
    full = lg.lcd_plan(_profiles(), MINILM, deadline=float("inf"), **EXP).configs
    assert pi.time_s > max(c.time_s for c in full[:3])


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9])
def test_minilm_deadline_between_gives_intermediate_ramps(quantile):
    profs = _profiles()
    full = [c.time_s for c in lg.lcd_plan(profs, MINILM, deadline=float("inf"), **EXP).configs]
    t_star = lg.deadline_between(profs, MINILM, quantile=quantile, **EXP)
    assert min(full) <= t_star <= max(full)
    plan = lg.lcd_plan(profs, MINILM, deadline=t_star, **EXP)
    assert plan.deadline == t_star
    inter = [c for c in plan.configs if lg.is_intermediate(c.ranks, 1, 8)]
    assert len(inter) >= 2, [(c.depth, c.ranks.tolist()) for c in plan.configs]
    for c in plan.configs:
        _assert_top_ramp(c.ranks)
    # Ranks actually rise toward the output in at least one intermediate device.
    assert any(c.ranks[-1] > c.ranks[6 - c.depth] for c in inter)
    for c in inter:
        assert c.feasible and c.time_s <= t_star


def test_deadline_between_bounds_and_validation():
    profs = _profiles()
    t = lg.deadline_between(profs, MINILM, bounds=(0.05, 0.16), **EXP)
    assert 0.05 <= t <= 0.16
    plan = lg.lcd_plan(profs, MINILM, deadline=t, **EXP)
    assert sum(lg.is_intermediate(c.ranks, 1, 8) for c in plan.configs) == 3  # Orin, Nano, phone
    ident = [profs[0]] * 3
    t1 = lg.deadline_between(ident, MINILM, **EXP)  # zero-width window: the common full time
    assert t1 == pytest.approx(lg.lcd_plan(ident, MINILM, deadline=float("inf"), **EXP).configs[0].time_s)
    for q in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="quantile"):
            lg.deadline_between(profs, MINILM, quantile=q, **EXP)
    for b in ((0.2, 0.1), (0.0, 1.0), (0.1, float("inf")), (0.1,)):
        with pytest.raises(ValueError, match="bounds"):
            lg.deadline_between(profs, MINILM, bounds=b, **EXP)
    with pytest.raises(ValueError, match="no device fits"):
        lg.deadline_between([_est("tiny", 1e12, mem=1.0)], SHAPE, **KW)
    with pytest.raises(ValueError, match="deadline"):
        lg.lcd_plan(profs, MINILM, deadline=0.0, **EXP)


# --- Placement control: the same payload on the bottom layers.

def test_mirror_to_bottom_and_bottom_ramp():
    top = np.array([[0, 0, 1, 2, 4], [0, 0, 0, 0, 0], [3, 3, 4, 5, 5]])
    np.testing.assert_array_equal(lg.mirror_to_bottom(top), [[4, 2, 1, 0, 0], [0] * 5, [5, 5, 4, 3, 3]])
    np.testing.assert_array_equal(lg.mirror_to_bottom(top[0]), [4, 2, 1, 0, 0])
    for d, budget in ((0, 0), (1, 5), (3, 10), (6, 30), (6, 48)):
        t = lg.rank_ramp(6, d, budget, 2, 8)
        b = lg.rank_ramp(6, d, budget, 2, 8, placement="bottom")
        np.testing.assert_array_equal(b, t[::-1])
        assert np.all(np.diff(b[:d]) <= 0) and np.all(b[d:] == 0)  # largest at layer 0
    np.testing.assert_array_equal(lg.depth_mask(5, 2, placement="bottom"), [True, True, False, False, False])
    with pytest.raises(ValueError, match="top placement"):
        lg.mirror_to_bottom([4, 2, 1, 0, 0])  # already mirrored: refused, not flipped back
    with pytest.raises(ValueError, match="non-negative"):
        lg.mirror_to_bottom([0, -1, 2])
    for call in (lambda: lg.rank_ramp(6, 2, 4, 1, 8, placement="middle"),
                 lambda: lg.depth_mask(6, 2, placement="Top"),
                 lambda: lg.config_cost(_est("a", 1e12), SHAPE, np.ones(6, int), 6, batch=1, steps=1,
                                        placement="random"),
                 lambda: lg.lcd_plan(_profiles(), MINILM, placement="bottm", **EXP)):
        with pytest.raises(ValueError, match="placement must be one of"):
            call()


@pytest.mark.parametrize("deadline", [0.1, 0.15, 1.2, None])
def test_bottom_control_same_payload_mirrored_and_costlier(deadline):
    profs = _profiles()
    top = lg.lcd_plan(profs, MINILM, deadline=deadline, **EXP)
    bot = lg.lcd_plan(profs, MINILM, deadline=deadline, placement="bottom", **EXP)
    assert bot.deadline == top.deadline
    shallow = 0
    for t, b, prof in zip(top.configs, bot.configs, profs, strict=True):
        assert b.depth == t.depth
        np.testing.assert_array_equal(b.ranks, lg.mirror_to_bottom(t.ranks))
        rep = lambda r: np.repeat(r[:, None], 2, axis=1)
        assert float(dv.payload_bytes(rep(b.ranks), MINILM)) == float(dv.payload_bytes(rep(t.ranks), MINILM))
        assert np.all(b.ranks[t.depth:] == 0) and np.all(np.diff(b.ranks[: t.depth]) <= 0)
        if 0 < t.depth < 6:  # backward through the whole model instead of the top d layers
            shallow += 1
            assert b.time_s > t.time_s and b.memory_bytes > t.memory_bytes
            want = lg.config_cost(lg.estimate_from_profile(prof), MINILM, b.ranks, b.depth, placement="bottom",
                                  batch=8, steps=4)
            assert (b.time_s, b.memory_bytes) == pytest.approx(want)
        else:
            assert b.time_s == pytest.approx(t.time_s)
    assert shallow >= 1
    assert bot.score >= top.score


# --- Capacity estimation from measured (simulated true-speed) times.

def _simulate(factor_of_device, rounds, t_star, *, drift=0.0, noise=0.0):
    """Rounds of plan -> clients train at their true speed -> reports -> EMA replan."""
    profs = _profiles()
    table = dv.stack_profiles(profs)
    dev_of_client = np.arange(8) % len(profs)
    cdev = dv.take_devices(table, dev_of_client)
    ests = [lg.estimate_from_profile(p) for p in profs]
    plan = lg.lcd_plan(ests, MINILM, deadline=t_star, **EXP)
    first = plan
    for h in range(rounds):
        lr = np.stack([plan.configs[d].ranks for d in dev_of_client])                    # [C, L]
        ranks = np.repeat(lr[:, :, None], 2, axis=2)                                      # [C, L, P]
        cut = 6 - np.array([plan.configs[d].depth for d in dev_of_client])
        flops = np.asarray(dv.client_flops(ranks, cut, MINILM, batch=8, steps=4), np.float64)
        nbytes = np.asarray(dv.payload_bytes(ranks, MINILM), np.float64)
        f = dv.true_speed_factor(np.arange(8), h, seed=0, drift=drift, noise=noise)
        f = f * np.asarray(factor_of_device)[dev_of_client]
        m = dv.measure_round(flops, nbytes, nbytes, cdev, f)
        meas = lg.measurements_from_reports(dev_of_client, flops, m.compute_s, nbytes, m.up_s, nbytes,
                                            m.down_s, len(profs))
        ests, plan = lg.replan(ests, meas, MINILM, deadline=t_star, **EXP)
    return profs, first, ests, plan


def test_estimate_still_when_true_speed_is_nominal():
    t_star = lg.deadline_between(_profiles(), MINILM, **EXP)
    profs, first, ests, plan = _simulate([1.0] * 4, 5, t_star)
    for p, e in zip(profs, ests, strict=True):
        e0 = lg.estimate_from_profile(p)
        assert e.flops_per_s == pytest.approx(e0.flops_per_s, rel=1e-6)
        assert e.uplink_bps == pytest.approx(e0.uplink_bps, rel=1e-6)
        assert e.downlink_bps == pytest.approx(e0.downlink_bps, rel=1e-6)
    for a, b in zip(first.configs, plan.configs, strict=True):
        np.testing.assert_array_equal(a.ranks, b.ranks)


def test_estimate_converges_to_true_speed_and_plan_shrinks():
    t_star = lg.deadline_between(_profiles(), MINILM, **EXP)
    nano = MIX.index("jetson_orin_nano_8gb")
    truth = np.ones(4)
    truth[nano] = 0.5  # the Nano is truly 2x slower (compute and links) than its profile says
    profs, first, ests, plan = _simulate(truth, 40, t_star)
    e0 = lg.estimate_from_profile(profs[nano])
    assert ests[nano].flops_per_s == pytest.approx(0.5 * e0.flops_per_s, rel=1e-3)
    assert ests[nano].uplink_bps == pytest.approx(0.5 * e0.uplink_bps, rel=1e-3)
    assert ests[nano].downlink_bps == pytest.approx(0.5 * e0.downlink_bps, rel=1e-3)
    for i in set(range(4)) - {nano}:
        assert ests[i].flops_per_s == pytest.approx(lg.estimate_from_profile(profs[i]).flops_per_s, rel=1e-6)
    before, after = first.configs[nano], plan.configs[nano]
    assert after.depth < before.depth or after.ranks.sum() < before.ranks.sum(), (before, after)
    # Drifting true speeds move the estimates (the old observe() never could).
    _, _, drifted, _ = _simulate([1.0] * 4, 5, t_star, drift=0.1, noise=0.05)
    assert all(e.flops_per_s != lg.estimate_from_profile(p).flops_per_s for p, e in zip(profs, drifted, strict=True))


def test_measurements_from_reports_means_and_validation():
    dev = np.array([0, 2, 0, 2, 2])
    fl = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
    comp = np.array([1.0, 1.0, 1.0, 2.0, 3.0])
    m = lg.measurements_from_reports(dev, fl, comp, fl * 10, comp / 2, fl * 20, comp / 4, 3)
    assert m[1] is None
    assert m[0] == lg.Measurement(2.0, 1.0, 20.0, 0.5, 40.0, 0.25)
    assert m[2].flops == pytest.approx(4.0) and m[2].compute_s == pytest.approx(2.0)
    new = lg.update_estimate(_est("x", 1.0, up=1.0, down=1.0), m[2], rho=0.0)
    assert new.flops_per_s == pytest.approx(12.0 / 6.0)  # sum work / sum time
    with pytest.raises(ValueError, match="num_devices"):
        lg.measurements_from_reports(dev, fl, comp, fl, comp, fl, comp, 2)
    with pytest.raises(ValueError, match="up_s"):
        lg.measurements_from_reports(dev, fl, comp, fl, comp[:2], fl, comp, 3)
    with pytest.raises(ValueError, match="compute_s"):
        lg.measurements_from_reports(dev, fl, -comp, fl, comp, fl, comp, 3)
    with pytest.raises(ValueError, match="device_of_client"):
        lg.measurements_from_reports(dev.astype(float), fl, comp, fl, comp, fl, comp, 3)


def test_planner_names_stay_importable_from_the_algorithm_module_and_the_package():
    """The planner moved out of ``legend.py``; its public names are re-exported there and in the package."""
    from fedlora_jax import algorithms
    from fedlora_jax.algorithms import legend

    for name in lg.__dict__.keys() & set(legend.__all__):
        assert getattr(legend, name) is getattr(lg, name), name
    assert {"lcd_plan", "rank_ramp", "CapacityEstimate", "replan"} <= set(legend.__all__)
    assert algorithms.lcd_plan is lg.lcd_plan and algorithms.rank_ramp is lg.rank_ramp
