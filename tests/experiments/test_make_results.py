"""make_results: per-run metrics, paired statistics, censoring rules and the rendered page,
against hand-computed numbers on synthetic runs (NumPy only, no model)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers.modules import import_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "experiments" / "configs"
T975_2 = 4.302652729911275  # t_{0.975} with 2 degrees of freedom (tables)
T95_2 = 2.919985580355516  # t_{0.95}, 2 degrees of freedom (tables; the 90% interval)


make_results = import_file(ROOT / "experiments" / "make_results.py", "make_results_under_test")


def _synthetic(accs, up, sim, energy, *, pre=0.5):
    """metrics rows: round -1 (acc ``pre``) then one row per round with cumulative counters;
    ``accs[r]`` None = round r not evaluated."""
    rows = [{"round": -1, "test_accuracy": pre}]
    for r, (a, u, s, e) in enumerate(zip(accs, np.cumsum(up), np.cumsum(sim), np.cumsum(energy), strict=True)):
        row = {"round": r, "cum_bytes_up": float(u), "cum_sim_time_s": float(s), "cum_energy_j": float(e)}
        if a is not None:
            row["test_accuracy"] = a
        rows.append(row)
    return rows


def _run(accs, *, up=1e6, sim=10.0):
    n = len(accs)
    return _synthetic(accs, [up] * n, [sim] * n, [100.0] * n)


# ----------------------------------------------------------------------------- per-run metrics

def test_accuracy_and_total_metrics_by_hand(tmp_path):
    a = _synthetic([0.6, 0.8, 0.7, 0.9], [1e6, 1e6, 2e6, 1e6], [10, 10, 10, 5], [100, 100, 100, 50])
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in a))
    assert make_results.read_jsonl(path) == a
    mv = make_results.metric_value
    assert mv(a, "final_acc") == 0.9
    assert mv(a, "best_acc") == 0.9
    assert mv(a, "last3_acc") == pytest.approx((0.8 + 0.7 + 0.9) / 3)  # last three, not the pre-training row
    assert mv(a, "total_mb") == pytest.approx(5.0)
    assert mv(a, "total_sim_s") == pytest.approx(35.0)
    assert mv(a, "total_energy_kj") == pytest.approx(0.35)
    assert make_results.mean_std([0.7, 0.9, None]) == (pytest.approx(0.8), pytest.approx(np.std([0.7, 0.9], ddof=1)))
    assert make_results.mean_std([0.7]) == (0.7, 0.0)


def test_last3_with_fewer_evaluations_and_single_seed():
    a = _run([0.6, 0.7])
    assert make_results.metric_value(a, "last3_acc") == pytest.approx(0.65)
    assert make_results.metric_value(_run([None, None]), "final_acc") is None


def test_auc_trapezoid_by_hand():
    # evaluated at x = 0 (pre, 0.5), x = 2 (0.7), x = 4 (0.9): (2*(0.5+0.7)/2 + 2*(0.7+0.9)/2) / 4 = 0.7
    a = _run([None, 0.7, None, 0.9])
    assert make_results.auc(a) == pytest.approx(0.7)
    assert make_results.metric_value(a, "auc") == pytest.approx(0.7)
    # unequal spacing: x = 0 (0.4), 1 (0.6), 4 (1.0): (1*0.5 + 3*0.8) / 4 = 0.725
    uneven = _synthetic([0.6, None, None, 1.0], [1] * 4, [1] * 4, [1] * 4, pre=0.4)
    assert make_results.auc(uneven) == pytest.approx(0.725)
    assert make_results.auc([{"round": -1, "test_accuracy": 0.5}]) is None


def test_to_target_metrics_by_hand():
    a = _synthetic([0.6, 0.8, 0.7], [1e6, 2e6, 1e6], [10, 5, 10], [1, 1, 1], pre=0.9)
    mv = make_results.metric_value
    # the pre-training row (0.9) never counts; round 1 (x = 2) is the first trained row >= 0.75
    assert mv(a, "rounds_to_target", 0.75) == 2.0
    assert mv(a, "mb_to_target", 0.75) == pytest.approx(3.0)
    assert mv(a, "sim_s_to_target", 0.75) == pytest.approx(15.0)
    assert mv(a, "rounds_to_target", 0.6) == 1.0  # >= counts
    assert mv(a, "rounds_to_target", 0.95) is None
    assert make_results.first_reaching(a, 0.95, "cum_sim_time_s") is None
    assert make_results.whole_run_value(a, "rounds_to_target") == 4.0  # 3 rounds run + 1
    assert make_results.whole_run_value(a, "mb_to_target") == pytest.approx(4.0)
    assert make_results.whole_run_value(a, "sim_s_to_target") == pytest.approx(25.0)
    with pytest.raises(ValueError, match="target"):
        mv(a, "rounds_to_target")


def test_slot_norm_distributed_diagnostic_and_budget_metrics():
    a = _run([0.6, 0.8])
    a[1]["global_slot_norm"] = [9.0] * 8
    a[2]["global_slot_norm"] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    a[1]["first_round_diagnostic"] = {"client": 3, "rank": 16, "local_accuracy": 0.7,
                                      "after_aggregation_accuracy": 0.55}
    a[2]["distributed_test_accuracy"] = {"4": 0.5, "16": 0.8}
    a[2]["global_ranks"] = {"q": 5, "v": 7}
    mv = make_results.metric_value
    assert mv(a, "slot_norm:4:8") == pytest.approx(26.0)  # last evaluated row, slots 4..7
    assert mv(a, "slot_norm:0:1") == pytest.approx(1.0)
    assert mv(a, "distributed_acc:4") == 0.5
    assert mv(a, "distribution_drop:4") == pytest.approx(0.3)
    assert mv(a, "distribution_drop:16") == pytest.approx(0.0)
    assert mv(a, "distributed_acc:8") is None
    assert mv(a, "diagnostic_drop") == pytest.approx(0.15)
    assert mv(a, "global_budget") == 12.0
    plain = _run([0.6])
    assert mv(plain, "slot_norm:0:4") is None and mv(plain, "diagnostic_drop") is None
    assert mv(plain, "global_budget") is None and mv(plain, "distributed_acc:4") is None
    with pytest.raises(ValueError, match="slots"):
        mv(a, "slot_norm:4:12")


@pytest.mark.parametrize("name", ["accuracy", "slot_norm:4", "slot_norm:8:4", "slot_norm:a:b", "final_acc:1",
                                  "distributed_acc"])
def test_unknown_metric_refused(name):
    with pytest.raises(ValueError, match="allowed"):
        make_results.parse_metric(name)


# ----------------------------------------------------------------------------- paired statistics

def test_t_interval_by_hand():
    iv = make_results.paired_interval([1.0, 2.0, 3.0])
    half = T975_2 * 1.0 / math.sqrt(3)
    assert (iv["n"], iv["mean"], iv["sd"]) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert (iv["lo"], iv["hi"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert make_results.paired_interval([0.3]) == {"n": 1, "mean": 0.3, "sd": None, "lo": None, "hi": None}


def _pairs(diffs, ref=10.0):
    return [{"seed": s, "arm": ref + d, "ref": ref} for s, d in enumerate(diffs)]


def test_verdict_holds_reversed_underpowered_and_too_few():
    def judge(pairs, direction, metric):
        return make_results.judge_claim(pairs, direction, metric, delta=0.1)
    # mean 1, sd 0.2: half width 4.303 * 0.2 / sqrt(3) = 0.497 -> [0.503, 1.497]
    res = judge(_pairs([1.0, 1.2, 0.8]), +1, "last3_acc")
    assert res["verdict"] == "holds"
    assert res["interval"]["lo"] == pytest.approx(1.0 - T975_2 * 0.2 / math.sqrt(3))
    assert [d for _, d, _ in res["diffs"]] == [pytest.approx(1.0), pytest.approx(1.2), pytest.approx(0.8)]
    assert res["ratio"] is None  # not a cost metric
    assert judge(_pairs([1.0, 1.2, 0.8]), -1, "last3_acc")["verdict"] == "does not hold (reversed)"
    # [1, 2, 3]: interval [-0.48, 4.48] straddles 0, 90% [0.31, 3.69] is far outside ±0.1
    assert judge(_pairs([1.0, 2.0, 3.0]), +1, "last3_acc")["verdict"] == "underpowered"
    one = judge(_pairs([5.0]), +1, "last3_acc")
    assert one["verdict"] == "underpowered" and one["seeds_needed"] is None
    assert any(n.startswith("fewer than 2 paired seeds") for n in one["notes"])
    assert make_results.verdict_text(one) == "underpowered (seeds needed: n/a)"
    assert judge([], +1, "last3_acc")["verdict"] == "pending"
    with pytest.raises(ValueError, match="direction"):
        judge(_pairs([1.0, 2.0]), 0, "last3_acc")


def test_ratio_of_means_for_cost_metrics():
    pairs = [{"seed": 0, "arm": 2.0, "ref": 5.0}, {"seed": 1, "arm": 2.0, "ref": 4.0}, {"seed": 2, "arm": 2.0, "ref": 3.0}]
    res = make_results.judge_claim(pairs, -1, "total_mb", delta=0.5)
    assert res["ratio"] == pytest.approx(4.0 / 2.0) and res["ratio_mark"] == ""
    # d = -3, -2, -1: every seed favours the arm, but mean -2, sd 1, half width 2.48 -> [-4.48, 0.48]
    assert res["verdict"] == "underpowered"


def test_undefined_metric_drops_the_pair():
    pairs = [{"seed": 0, "arm": 1.0, "ref": 0.0}, {"seed": 1, "arm": None, "ref": 0.0},
             {"seed": 2, "arm": 1.1, "ref": 0.0}, {"seed": 3, "arm": 0.9, "ref": 0.0}]
    res = make_results.judge_claim(pairs, +1, "slot_norm:0:4", delta=0.1)
    assert res["interval"]["n"] == 3 and res["verdict"] == "holds"
    assert any("seed(s) 1" in n for n in res["notes"])


# ----------------------------------------------------------------------------- equivalence margin

T95_3, T95_4 = 2.353363434801823, 2.131846786326649  # t_{0.95} with 3 / 4 degrees of freedom (tables)


def test_equivalent_when_the_90_interval_is_inside_the_margin():
    # d = -0.002, 0, 0.002: mean 0, sd 0.002; 95% half 4.303 * 0.002 / sqrt(3) = 0.00497 straddles 0;
    # 90% half 2.920 * 0.002 / sqrt(3) = 0.00337 -> [-0.00337, 0.00337] inside (-0.01, 0.01)
    res = make_results.judge_claim(_pairs([-0.002, 0.0, 0.002]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "equivalent"
    assert res["tost"]["hi"] == pytest.approx(T95_2 * 0.002 / math.sqrt(3))
    assert res["interval"]["hi"] == pytest.approx(T975_2 * 0.002 / math.sqrt(3))
    assert make_results.verdict_text(res) == "equivalent within ±0.01"
    # the same differences against a margin the 90% interval crosses: underpowered
    assert make_results.judge_claim(_pairs([-0.002, 0.0, 0.002]), +1, "last3_acc", delta=0.003)["verdict"] == \
        "underpowered"


def test_interval_crossing_the_margin_is_underpowered_with_the_seeds_needed():
    # d = -0.01, 0, 0.01: mean 0, sd 0.01; 90% half 2.920 * 0.01 / sqrt(3) = 0.0169 > 0.01.
    # n* = min n with t(0.95, n-1) * 0.01 / sqrt(n) <= 0.01, i.e. t(0.95, n-1) <= sqrt(n):
    # n = 3: 2.920 > 1.732; n = 4: 2.353 > 2; n = 5: 2.132 <= 2.236 -> 5
    assert T95_3 > math.sqrt(4) and T95_4 <= math.sqrt(5)
    res = make_results.judge_claim(_pairs([-0.01, 0.0, 0.01]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "underpowered"
    assert (res["seeds_needed"], res["seeds_needed_at_mean"]) == (5, 5)
    assert make_results.verdict_text(res) == "underpowered (5 seeds needed; 5 at the observed mean)"
    assert any(n.startswith("5 paired seeds would give a 90% interval of ±0.01") for n in res["notes"])
    # d = 0, 0.005, 0.01: mean 0.005, sd 0.005, 90% [-0.0034, 0.0134] crosses +0.01. The half-width alone
    # is within 0.01 already at n = 3 (2.920 * 0.005 / sqrt(3) = 0.0084), but the mean leaves 0.005:
    # t(0.95, n-1) / sqrt(n) <= 1 first at n = 5 (n = 4: 2.353 / 2 = 1.18; n = 5: 2.132 / 2.236 = 0.95)
    res = make_results.judge_claim(_pairs([0.0, 0.005, 0.01]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "underpowered"
    assert (res["seeds_needed"], res["seeds_needed_at_mean"]) == (3, 5)
    # a mean outside the margin: no count for equivalence, and the page says why
    res = make_results.judge_claim(_pairs([0.0, 0.02, 0.04]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "underpowered" and res["seeds_needed_at_mean"] is None
    assert make_results.verdict_text(res).endswith("; mean outside ±δ)")


def test_seeds_needed_by_hand():
    assert make_results.seeds_needed(0.01, 0.01) == 5
    assert make_results.seeds_needed(0.005, 0.01) == 3
    assert make_results.seeds_needed(1e-9, 0.01) == 2  # never fewer than 2 pairs
    # large ratio: near (z(0.95) * sd / delta)^2 = (1.645 * 10)^2 = 270.6, t adds a few
    n = make_results.seeds_needed(0.1, 0.01)
    t = make_results.stats.t.ppf
    assert t(0.95, n - 1) * 0.1 / math.sqrt(n) <= 0.01 < t(0.95, n - 2) * 0.1 / math.sqrt(n - 1)
    assert make_results.seeds_needed(0.0, 0.01) is None and make_results.seeds_needed(None, 0.01) is None
    with pytest.raises(ValueError, match="delta"):
        make_results.seeds_needed(0.01, 0.0)


def test_zero_sd():
    # identical arms: interval [0, 0], inside any margin
    res = make_results.judge_claim(_pairs([0.0, 0.0, 0.0]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "equivalent" and res["seeds_needed"] is None
    # a constant nonzero difference decides the direction
    assert make_results.judge_claim(_pairs([0.02] * 3), +1, "last3_acc", delta=0.01)["verdict"] == "holds"
    # sd 0 but equivalence ruled out (neither arm reached the target in seed 0): no count to print
    pairs = [{"seed": 0, "arm": None, "ref": None}, {"seed": 1, "arm": 4.0, "ref": 4.0},
             {"seed": 2, "arm": 4.0, "ref": 4.0}]
    res = make_results.judge_claim(pairs, -1, "rounds_to_target", delta=2.0)
    assert res["verdict"] == "underpowered" and res["seeds_needed"] is None
    assert "the observed sd is 0: no spread to size the seeds needed from" in res["notes"]
    assert "a censored or unreached seed rules out equivalence" in res["notes"]
    assert make_results.verdict_text(res) == "underpowered (seeds needed: n/a)"


def test_holds_and_reversed_take_precedence_over_equivalent():
    # d = 0.004, 0.005, 0.006: mean 0.005, sd 0.001; 95% half 0.00248 -> [0.0025, 0.0075] excludes 0,
    # and the 90% interval [0.0033, 0.0067] is inside ±0.01 as well: holds, with a note
    res = make_results.judge_claim(_pairs([0.004, 0.005, 0.006]), +1, "last3_acc", delta=0.01)
    assert res["verdict"] == "holds"
    assert -0.01 < res["tost"]["lo"] and res["tost"]["hi"] < 0.01
    assert any("also inside ±0.01" in n for n in res["notes"])
    assert make_results.judge_claim(_pairs([0.004, 0.005, 0.006]), -1, "last3_acc", delta=0.01)["verdict"] == \
        "does not hold (reversed)"


def test_censored_bound_rules_out_equivalence():
    # the ref never reaches the target in seed 0: its whole-run bound (4 rounds + 1 = 5) is used, d <= 0
    arm = {s: _run([0.5, 0.5, 0.5, 0.9]) for s in range(3)}
    ref = {0: _run([0.5, 0.5, 0.5, 0.5]), 1: _run([0.5, 0.5, 0.5, 0.9]), 2: _run([0.5, 0.5, 0.5, 0.9])}
    pairs = make_results.claim_pairs(arm, ref, "rounds_to_target", 0.8)
    res = make_results.judge_claim(pairs, -1, "rounds_to_target", delta=2.0, arm_runs=arm, ref_runs=ref)
    assert res["diffs"] == [(0, -1.0, "≤"), (1, 0.0, ""), (2, 0.0, "")]
    # 90% interval: mean -1/3, sd 0.577, half 0.973 -> inside ±2, but the bound is one-sided
    assert -2.0 < res["tost"]["lo"] and res["tost"]["hi"] < 2.0
    assert res["verdict"] == "underpowered"


# ----------------------------------------------------------------------------- censoring


def test_censoring_arm_never_reached_cannot_hold():
    arm = {0: _run([0.5, 0.6, 0.6]), 1: _run([0.9, 0.9, 0.9]), 2: _run([0.9, 0.9, 0.9])}
    ref = {0: _run([0.5, 0.9, 0.9]), 1: _run([0.5, 0.5, 0.9]), 2: _run([0.5, 0.5, 0.9])}
    pairs = make_results.claim_pairs(arm, ref, "rounds_to_target", 0.8)
    assert [(p["arm"], p["ref"]) for p in pairs] == [(None, 2.0), (1.0, 3.0), (1.0, 3.0)]
    res = make_results.judge_claim(pairs, -1, "rounds_to_target", delta=2.0, arm_runs=arm, ref_runs=ref)
    assert res["verdict"] == "does not hold"  # arm missed in seed 0, where the ref reached it
    assert "seed(s) 0" in res["notes"][0]
    # neither reached in seed 0: cannot hold, and nothing to say against it either
    ref[0] = _run([0.5, 0.5, 0.5])
    pairs = make_results.claim_pairs(arm, ref, "rounds_to_target", 0.8)
    res = make_results.judge_claim(pairs, -1, "rounds_to_target", delta=2.0, arm_runs=arm, ref_runs=ref)
    assert res["verdict"] == "underpowered" and any("neither" in n for n in res["notes"])
    # direction +1: the claimed-cheaper side is the ref
    res = make_results.judge_claim(make_results.claim_pairs(ref, arm, "rounds_to_target", 0.8), +1,
                                   "rounds_to_target", delta=2.0, arm_runs=ref, ref_runs=arm)
    assert res["verdict"] == "underpowered"


def test_censoring_ref_never_reached_substitutes_the_whole_run_bound():
    arm = {s: _run([0.5, 0.9, 0.9, 0.9], up=1e6) for s in range(3)}
    ref = {0: _run([0.5, 0.5, 0.5, 0.5], up=3e6), 1: _run([0.5, 0.5, 0.5, 0.9], up=3e6),
           2: _run([0.5, 0.5, 0.9, 0.9], up=3e6)}
    pairs = make_results.claim_pairs(arm, ref, "rounds_to_target", 0.8)
    res = make_results.judge_claim(pairs, -1, "rounds_to_target", delta=2.0, arm_runs=arm, ref_runs=ref)
    # seed 0: ref bound = 4 rounds run + 1 = 5 -> d <= 2 - 5 = -3; seeds 1, 2: 2 - 4 = -2, 2 - 3 = -1
    assert res["diffs"] == [(0, -3.0, "≤"), (1, -2.0, ""), (2, -1.0, "")]
    assert res["interval"]["mean"] == pytest.approx(-2.0)
    assert res["verdict"] == "underpowered"  # [-4.48, 0.48]
    assert res["ratio"] == pytest.approx(4.0 / 2.0) and res["ratio_mark"] == "≥"
    assert any("whole-run value" in n for n in res["notes"])
    mb = make_results.judge_claim(make_results.claim_pairs(arm, ref, "mb_to_target", 0.8), -1, "mb_to_target",
                                  delta=1.0, arm_runs=arm, ref_runs=ref)
    # seed 0: ref total 12 MB -> d <= 2 - 12 = -10; seed 1: 2 - 12 = -10; seed 2: 2 - 9 = -7
    assert [d for _, d, _ in mb["diffs"]] == [pytest.approx(-10.0), pytest.approx(-10.0), pytest.approx(-7.0)]
    assert mb["verdict"] == "holds"  # mean -9, sd sqrt(3): [-13.3, -4.7]


def test_censored_bound_never_establishes_a_reversal():
    # the arm reaches the target late, using more MB than the ref's whole (censored) run
    arm = {s: _run([0.5, 0.5, 0.9], up=5e6 + s * 1e5) for s in range(3)}
    ref = {s: _run([0.5, 0.5, 0.5], up=1e6) for s in range(3)}
    pairs = make_results.claim_pairs(arm, ref, "mb_to_target", 0.8)
    res = make_results.judge_claim(pairs, -1, "mb_to_target", delta=1.0, arm_runs=arm, ref_runs=ref)
    assert res["interval"]["lo"] > 0
    assert res["verdict"] == "underpowered" and "a censored bound cannot establish a reversal" in res["notes"]


# ----------------------------------------------------------------------------- curves, groups

def test_curves_and_mean_curve():
    a = _synthetic([0.6, 0.8], [1e6, 1e6], [2.0, 2.0], [1.0, 1.0])
    b = _synthetic([0.8, 0.6, 0.9], [1e6, 1e6, 1e6], [4.0, 4.0, 4.0], [1.0, 1.0, 1.0])
    x, y = make_results.eval_curve(a, "round")
    np.testing.assert_allclose(x, [0, 1, 2])
    np.testing.assert_allclose(y, [0.5, 0.6, 0.8])
    x, _ = make_results.eval_curve(b, "cum_sim_time_s")
    np.testing.assert_allclose(x, [0, 4, 8, 12])
    mx, my, sd = make_results.mean_curve([make_results.eval_curve(r, "cum_sim_time_s") for r in (a, b)])
    np.testing.assert_allclose(mx, [0, 3, 6])
    np.testing.assert_allclose(my, [0.5, 0.7, 0.7])
    np.testing.assert_allclose(sd, [0.0, np.std([0.6, 0.8], ddof=1), np.std([0.8, 0.6], ddof=1)])


def test_identical_groups_detects_equal_runs_only():
    a = _run([0.6, 0.8])
    b = _run([0.6, 0.9])
    a_wall = [dict(r, wall_s=3.0) for r in a]
    groups = {("x", None): {0: a}, ("y", None): {0: a_wall}, ("z", None): {0: b}, ("w", None): {1: a}}
    assert make_results.identical_groups(groups) == [(("x", None), ("y", None))]


# ----------------------------------------------------------------------------- configs

COMPARISON_CONFIGS = [CONFIG_DIR / f"{n}.py" for n in make_results.COMPARISONS]


@pytest.mark.parametrize("path", COMPARISON_CONFIGS, ids=lambda p: p.stem)
def test_real_config_claims_name_known_arms_and_metrics(path):
    module = make_results.load_module(path)
    make_results.validate_config(module)
    if not getattr(module, "CLAIMS", ()):   # a diagnostic (fedara_prune): read against another comparison
        assert getattr(module, "TARGET", None) is None and module.__doc__.startswith("Diagnostic")
    for claim in getattr(module, "CLAIMS", ()):
        assert claim["arm"] in module.METHODS and claim["ref"] in module.METHODS
        make_results.parse_metric(claim["metric"])
        assert module.MARGINS[claim["metric"]]["delta"] > 0 and module.MARGINS[claim["metric"]]["reason"]


class _Module:
    METHODS = {"a": {}, "b": {}}
    TARGET = {"fraction": 0.9, "reference": "b"}
    MARGINS = {m: {"delta": 0.01, "reason": "one point"} for m in ("last3_acc", "auc", "mb_to_target")}


def _claim(**kw):
    return {"claim": "a beats b", "arm": "a", "ref": "b", "metric": "last3_acc", "direction": 1} | kw


@pytest.mark.parametrize("claim, match", [
    (_claim(metric="accuracy"), "a beats b.*allowed"),
    (_claim(arm="c"), "a beats b.*not in METHODS"),
    (_claim(direction=2), "direction"),
    ({"claim": "x", "arm": "a", "ref": "b", "metric": "auc"}, "keys"),
])
def test_malformed_claims_refused(claim, match):
    module = type("M", (_Module,), {"CLAIMS": (claim,)})
    with pytest.raises(ValueError, match=match):
        make_results.validate_config(module)


@pytest.mark.parametrize("margins, match", [
    (None, "must declare MARGINS"),
    ({"auc": {"delta": 0.01, "reason": "x"}}, "a beats b.*no equivalence margin for metric 'last3_acc'"),
    ({"last3_acc": {"delta": 0.0, "reason": "x"}}, "delta must be a finite number > 0"),
    ({"last3_acc": {"delta": -0.01, "reason": "x"}}, "delta must be a finite number > 0"),
    ({"last3_acc": {"delta": math.inf, "reason": "x"}}, "delta must be a finite number > 0"),
    ({"last3_acc": {"delta": "0.01", "reason": "x"}}, "delta must be a finite number > 0"),
    ({"last3_acc": {"delta": True, "reason": "x"}}, "delta must be a finite number > 0"),
    ({"last3_acc": {"delta": 0.01, "reason": " "}}, "reason must be a non-empty string"),
    ({"last3_acc": {"delta": 0.01}}, "must be {'delta': d, 'reason': str}"),
    ({"last3_acc": 0.01}, "must be {'delta': d, 'reason': str}"),
    ({"last3_acc": {"delta": 0.01, "reason": "x"}, "accuracy": {"delta": 0.01, "reason": "x"}},
     "MARGINS: unknown metric 'accuracy'"),
])
def test_claim_without_a_valid_margin_refused(margins, match):
    module = type("M", (_Module,), {"CLAIMS": (_claim(),), "MARGINS": margins})
    with pytest.raises(ValueError, match=match):
        make_results.validate_config(module)
    # a diagnostic without claims needs no margins
    make_results.validate_config(type("D", (), {"METHODS": {"a": {}}}))


def test_to_target_claim_needs_target():
    module = type("M", (), {"METHODS": {"a": {}, "b": {}}, "CLAIMS": (_claim(metric="mb_to_target"),),
                            "MARGINS": _Module.MARGINS})
    with pytest.raises(ValueError, match="needs TARGET"):
        make_results.validate_config(module)


# ----------------------------------------------------------------------------- whole section

FAKE_CONFIG = '''"""Fake comparison: fast beats slow.

Second paragraph, not on the page.
"""

SEEDS = (0, 1, 2)
METHODS = {"fast": {"algorithm": "fedit"}, "slow": {"algorithm": "fedit"}, "late": {"algorithm": "fedit"},
           "twin": {"algorithm": "fedit"}}
TARGET = {"fraction": 0.9, "reference": "slow"}
CLAIMS = (
    {"claim": "fast ends higher", "arm": "fast", "ref": "slow", "metric": "last3_acc", "direction": +1},
    {"claim": "fast needs fewer rounds", "arm": "fast", "ref": "slow", "metric": "rounds_to_target", "direction": -1},
    {"claim": "fast sends less to the target", "arm": "fast", "ref": "slow", "metric": "mb_to_target",
     "direction": -1},
    {"claim": "fast dilutes less", "arm": "fast", "ref": "slow", "metric": "slot_norm:4:8", "direction": +1},
    {"claim": "late is not done", "arm": "late", "ref": "slow", "metric": "auc", "direction": +1},
)
MARGINS = {m: {"delta": d, "reason": f"toy margin of {m}"}
           for m, d in (("last3_acc", 0.01), ("rounds_to_target", 2.0), ("mb_to_target", 0.5),
                        ("slot_norm:4:8", 0.1), ("auc", 0.01))}
DIFFERENCES = "a toy setting"


def get_config(variant="full"):
    raise AssertionError("make_results must not build configs")
'''


def _write_run(root: Path, name: str, rows, wall_s=60.0):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"wall_s": wall_s}))


def _with_norms(rows, norm):
    for r in rows:
        if r["round"] >= 0 and "test_accuracy" in r:
            r["global_slot_norm"] = [1.0] * 4 + [norm] * 4
    return rows


def test_section_rendered_from_run_directories(tmp_path):
    configs, results, plots = tmp_path / "configs", tmp_path / "results", tmp_path / "plots"
    configs.mkdir()
    (configs / "toy.py").write_text(FAKE_CONFIG)
    for s in range(3):
        _write_run(results / "toy", f"fast_s{s}", _with_norms(_run([0.7, 0.9, 0.9 + 0.01 * s], up=1e6), 2.0 + s))
        _write_run(results / "toy", f"slow_s{s}", _with_norms(_run([0.6, 0.7, 0.8 - 0.01 * s], up=2e6), 0.5))
        _write_run(results / "toy", f"twin_s{s}", _with_norms(_run([0.6, 0.7, 0.8 - 0.01 * s], up=2e6), 0.5))
    _write_run(results / "toy", "late_s0", _run([0.6, 0.7, 0.8]))  # one seed: plotting must not fail
    (results / "toy" / "late_s1").mkdir()  # unfinished: no summary.json
    (results / "toy" / "old_arm_s0").mkdir()
    (results / "toy" / "old_arm_s0" / "summary.json").write_text(json.dumps({"wall_s": 6000.0}))

    module, groups = make_results.load_comparison(results, "toy", configs)
    assert sorted(groups) == [("fast", None), ("late", None), ("slow", None), ("twin", None)]
    assert sorted(groups[("fast", None)]) == [0, 1, 2] and sorted(groups[("late", None)]) == [0]
    assert make_results.wall_minutes(results, "toy", module) == pytest.approx(10 * 60.0 / 60)

    page = make_results.section("toy", results, configs, plots)
    assert page.startswith("## toy\n\nFake comparison: fast beats slow.\n")
    assert "Second paragraph" not in page
    assert "Runs: 10, measured CPU wall time 10.0 min." in page
    slow_last3 = np.mean([np.mean([0.6, 0.7, 0.8 - 0.01 * s]) for s in range(3)])
    assert f"Target accuracy: {0.9 * slow_last3:.3f} = 0.90 x" in page
    # target 0.63: fast reaches it at x = 1 (1 MB), slow at x = 2 (4 MB) in every seed
    assert "| fast | 3 | 0.500 ± 0.000 | 0.910 ± 0.010 |" in page
    assert "1.0 ± 0.0 (3/3)" in page
    assert "- **fast ends higher** — holds:" in page
    assert "- **fast needs fewer rounds** — holds:" in page
    assert "s0: -1.0, s1: -1.0, s2: -1.0" in page
    assert "ref/arm ratio of means 4.00x" in page  # mb_to_target: 4 MB / 1 MB
    assert "- **fast dilutes less** — holds:" in page
    assert "- **late is not done** — underpowered (seeds needed: n/a):" in page
    assert "fewer than 2 paired seeds" in page
    assert "Equivalence margins (declared in the config):" in page
    assert "- `rounds_to_target`: ±2. toy margin of rounds_to_target" in page
    assert "Global slot norm" in page and "slots 4-7" in page
    assert "Differences from the paper: a toy setting" in page
    assert "Note: `slow` and `twin` produced byte-identical metrics" in page
    assert "![toy.png](results/plots/toy.png)" in page
    assert (plots / "toy.png").stat().st_size > 0


def test_section_pending_and_empty(tmp_path):
    configs, results = tmp_path / "configs", tmp_path / "results"
    configs.mkdir()
    (configs / "toy.py").write_text(FAKE_CONFIG)
    (results / "toy").mkdir(parents=True)
    assert make_results.section("toy", results, configs, tmp_path / "plots") == "## toy\n\nNo finished runs.\n"
    _write_run(results / "toy", "fast_s0", _run([0.7, 0.9]))
    page = make_results.section("toy", results, configs, tmp_path / "plots")
    assert "Target accuracy: pending (reference arm `slow` has no finished run)." in page
    assert "- **fast ends higher** — pending:" in page
    assert "- **fast needs fewer rounds** — pending: no target accuracy yet" in page


def test_device_plans_and_plan_table():
    row = {"round": 0, "client_device": ["orin", "pi", "orin"],
           "active_ranks": {"layer.0.query": [8, 0, 8], "layer.0.value": [6, 0, 8],
                            "layer.1.query": [8, 1, 8], "layer.1.value": [8, 2, 8]}}
    rows = [{"round": -1, "test_accuracy": 0.3}, row]
    assert make_results.device_plans(rows) == {"orin": (8, 8), "pi": (0, 2)}
    assert make_results.device_plans([{"round": 0, "active_ranks": {}}]) == {}
    uniform = dict(row, active_ranks={k: [8, 8, 8] for k in row["active_ranks"]})
    table = make_results.plan_table({("legend", None): {0: rows}, ("uniform", None): {0: [uniform]}})
    text = "\n".join(table)
    assert "| legend | pi | 1 | 0 2 |" in text and "| uniform | orin | 2 | 8 8 |" in text
    assert make_results.plan_table({("uniform", None): {0: [uniform]}}) == []
    one_device = dict(row, client_device=["orin"] * 3)               # one device type: nothing to show
    assert make_results.plan_table({("legend", None): {0: [one_device]}, ("uniform", None): {0: [uniform]}}) == []


def test_initial_accuracy_is_the_pre_training_row():
    rows = [{"round": -1, "test_accuracy": 0.31}, {"round": 0, "test_accuracy": 0.5}]
    assert make_results.metric_value(rows, "initial_acc") == 0.31
    assert make_results.metric_value(rows[1:], "initial_acc") is None


def test_read_partition_reads_the_drivers_table(tmp_path):
    from fedlora_jax.data.partition import partition_table

    labels = np.array([0, 1, 1, 2, 0, 0, 3])
    parts = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5, 6])]
    (tmp_path / "partition.txt").write_text(partition_table(parts, labels, 4, label_names=["W", "S", "B", "T"]) + "\n")
    names, hist = make_results.read_partition(tmp_path / "partition.txt")
    assert names == ["W", "S", "B", "T"]
    assert hist.tolist() == [[1, 2, 0, 0], [0, 0, 1, 0], [2, 0, 0, 1]]
    (tmp_path / "bad.txt").write_text("not a table\n")
    with pytest.raises(ValueError, match="not a partition table"):
        make_results.read_partition(tmp_path / "bad.txt")


def _ranked_rows(ranks, class_acc):
    """Two trained rounds; clients 0-1 take part in round 0, the rest in round 1."""
    k = len(ranks)
    first, second = list(range(2)), list(range(2, k))
    return [{"round": -1, "test_accuracy": 0.25},
            {"round": 0, "clients": first, "active_ranks": {"l.0.q": [ranks[c] for c in first],
                                                           "l.0.v": [ranks[c] - 1 for c in first]}},
            {"round": 1, "clients": second, "active_ranks": {"l.0.q": [ranks[c] for c in second],
                                                            "l.0.v": [0 for _ in second]},
             "test_accuracy": 0.5, "test_class_accuracy": class_acc}]


def test_rank_share_and_class_accuracy_tables():
    hist = np.array([[10, 0], [0, 5], [30, 5], [0, 10]])
    rows = _ranked_rows([8, 2, 8, 2], [0.9, None])
    assert make_results.client_ranks_seen(rows) == {0: 8, 1: 2, 2: 8, 3: 2}
    top, clients, share = make_results.top_rank_share(rows, hist)
    assert (top, clients) == (8, [0, 2])
    np.testing.assert_allclose(share, [40 / 40, 5 / 20])
    assert make_results.top_rank_share(_ranked_rows([4, 4, 4, 4], [0.9, 0.1]), hist) is None   # one rank
    assert make_results.top_rank_share(rows[:2], hist) is None                                  # clients unseen
    sub = {("a", None): {0: rows, 1: _ranked_rows([2, 8, 2, 8], [0.7, 0.3])}}
    parts = {("a", None, 0): (["W", "S"], hist), ("a", None, 1): (["W", "S"], hist)}
    text = "\n".join(make_results.diagnostic_tables(sub, parts))
    assert "| a | 0 | 8 | 0 2 | 1.00 | 0.25 |" in text
    assert "| a | 1 | 8 | 1 3 | 0.00 | 0.75 |" in text
    # arms with the same ranks share one row
    two = {**sub, ("b", None): {0: rows}}
    parts2 = {**parts, ("b", None, 0): (["W", "S"], hist)}
    text2 = "\n".join(make_results.diagnostic_tables(two, parts2))
    assert "| a, b | 0 | 8 | 0 2 | 1.00 | 0.25 |" in text2 and "| a | 1 | 8 | 1 3 |" in text2
    # per-class accuracy: mean ± sd over seeds; a class absent from the test set (None) is n/a
    assert "| arm | seeds | W | S |" in text
    assert "| a | 2 | 0.800 ± 0.141 | 0.300 ± 0.000 |" in text
    assert make_results.diagnostic_tables({("a", None): {0: rows[:2]}}) == []


def test_verdict_overview_lists_every_claim(tmp_path):
    configs, results = tmp_path / "configs", tmp_path / "results"
    configs.mkdir()
    (configs / "toy.py").write_text(FAKE_CONFIG)
    for s in range(3):
        _write_run(results / "toy", f"fast_s{s}", _with_norms(_run([0.7, 0.9, 0.9 + 0.01 * s], up=1e6), 2.0 + s))
        _write_run(results / "toy", f"slow_s{s}", _with_norms(_run([0.6, 0.7, 0.8 - 0.01 * s], up=2e6), 0.5))
    text = make_results.verdict_overview(results, configs, names=("toy", "absent"))
    module = make_results.load_module(configs / "toy.py")
    lines = [ln for ln in text.splitlines() if ln.startswith("| toy |")]
    assert len(lines) == len(module.CLAIMS)
    assert any("fast ends higher" in ln and "| 3 | **holds** |" in ln for ln in lines)
    assert any("late is not done" in ln and "**pending**" in ln for ln in lines)
    assert make_results.verdict_overview(results, configs, names=("absent",)) == ""


def test_write_page_writes_the_sections_and_removes_stale_plots(tmp_path):
    configs, results = tmp_path / "configs", tmp_path / "results"
    configs.mkdir()
    (configs / "toy.py").write_text(FAKE_CONFIG)
    for s in range(2):
        _write_run(results / "toy", f"fast_s{s}", _run([0.7, 0.9]))
        _write_run(results / "toy", f"slow_s{s}", _run([0.6, 0.7]))
    (results / "plots").mkdir()
    (results / "plots" / "toy_dirichlet_alpha1.0.png").write_bytes(b"old")   # a sweep value no longer run
    (results / "plots" / "notes.txt").write_text("kept")                      # only PNGs are the page's
    preamble, readme = tmp_path / "pre.md", tmp_path / "README.md"
    preamble.write_text("# Toy results\n")
    page = make_results.write_page(results, configs, readme, preamble, names=("toy", "absent"))
    assert readme.read_text() == page and page.startswith("# Toy results\n")
    assert "## Verdicts at a glance" in page and "## toy" in page and "## absent" not in page
    assert sorted(p.name for p in (results / "plots").iterdir()) == ["notes.txt", "toy.png"]
    assert not list(tmp_path.glob(".README.md.*"))                             # no temp file left behind


def test_allocation_table_by_hand():
    def run(ranks, cut, slowest):
        return [{"round": -1, "test_accuracy": 0.3},
                {"round": 0, "global_ranks": {k: 8 for k in ranks}, "grad_cut": [0, 0]},
                {"round": 1, "global_ranks": ranks, "grad_cut": [cut, cut + 1], "client_sim_time_s": [slowest, 0.1],
                 "test_accuracy": 0.5}]
    a = run({"layer.0.query": 0, "layer.0.value": 0, "layer.1.query": 3, "layer.1.value": 4}, 1, 5.0)
    b = run({"layer.0.query": 0, "layer.0.value": 2, "layer.1.query": 3, "layer.1.value": 4}, 0, 6.0)
    fixed = [{"round": -1, "test_accuracy": 0.3}, {"round": 0, "test_accuracy": 0.5}]
    empty = run({"layer.0.query": 0, "layer.1.query": 0}, 2, 0.1)          # head-only: nothing allocated
    text = "\n".join(make_results.allocation_table({("fedara", None): {0: a, 1: b}, ("fixed", None): {0: fixed},
                                                    ("head", None): {0: empty}}))
    # per layer: (0 + 2) / 2 = 1.0 and 7; budget (7 + 9) / 2 = 8; pruned (2 + 1) / 2; lowest layer (1 + 0) / 2
    assert "| fedara | 2 | 1.0 7.0 | 8.0 ± 1.4 | 1.5 ± 0.7 | 0.5 ± 0.7 | 5.50 ± 0.71 |" in text
    assert "| fixed |" not in text and "| head |" not in text
    assert make_results.allocation_table({("fixed", None): {0: fixed}}) == []
    assert make_results.layer_of("model.layers.12.self_attn.q_proj") == 12
    with pytest.raises(ValueError, match="no layer index"):
        make_results.layer_of("classifier")


def test_rank_share_needs_ranks_that_differ_within_a_round():
    hist = np.array([[10, 0], [0, 5], [30, 5], [0, 10]])
    # everyone at 8 in round 0, everyone at 2 in round 1 (a schedule, not heterogeneous clients)
    rows = [{"round": -1, "test_accuracy": 0.25},
            {"round": 0, "clients": [0, 1], "active_ranks": {"l.0.q": [8, 8]}},
            {"round": 1, "clients": [2, 3], "active_ranks": {"l.0.q": [2, 2]}, "test_accuracy": 0.5}]
    assert make_results.client_ranks_seen(rows) == {0: 8, 1: 8, 2: 2, 3: 2}
    assert not make_results.ranks_differ_within_a_round(rows)
    assert make_results.top_rank_share(rows, hist) is None
    assert make_results.ranks_differ_within_a_round(_ranked_rows([8, 2, 8, 2], [0.9, None]))


# ----------------------------------------------------------------------------- pilots

def test_pilot_rows_against_an_arm_and_against_the_initial_accuracy():
    import types

    groups = {("lora", None): {0: _run([0.6, 0.7, 0.8, 0.9], sim=1.0), 1: _run([0.6, 0.7, 0.72, 0.74])},
              ("head", None): {0: _run([0.6, 0.7, 0.8, 0.8]), 1: _run([0.6, 0.7, 0.7, 0.7])}}
    against_arm = types.SimpleNamespace(SEEDS=(0, 1), PILOT={"arm": "lora", "control": "head",
                                                             "metric": "last3_acc", "min_gain": 0.05})
    rows, keep = make_results.pilot_rows(against_arm, groups)
    # last3: seed 0: (0.7 + 0.8 + 0.9) / 3 = 0.8 vs (0.7 + 0.8 + 0.8) / 3 = 0.7667; seed 1: 0.72 vs 0.7
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["gain"] == pytest.approx(0.8 - 2.3 / 3) and rows[1]["gain"] == pytest.approx(0.02)
    assert keep is False  # 0.033 and 0.02 fall short of 0.05
    against_start = types.SimpleNamespace(SEEDS=(0, 1), PILOT={"arm": "lora", "control": "initial",
                                                               "metric": "last3_acc", "min_gain": 0.05})
    rows, keep = make_results.pilot_rows(against_start, groups)
    # the control is each run's round -1 evaluation (0.5): gains 0.3 and 0.22
    assert [round(r["gain"], 6) for r in rows] == [0.3, 0.22] and keep is True
    assert make_results.pilot_rows(against_arm, {("lora", None): groups[("lora", None)]}) == ([], None)
    # one seed of two finished and above the bar: pending; below it: already a drop
    one = {k: {0: runs[0]} for k, runs in groups.items()}
    assert make_results.pilot_rows(against_start, one)[1] is None
    assert make_results.pilot_rows(against_arm, {("lora", None): {1: groups[("lora", None)][1]},
                                                 ("head", None): groups[("head", None)]})[1] is False


def test_decided_text_counts_decided_claims_overall_and_for_accuracy():
    """Hand count: 6 claims, 3 decided (holds, equivalent, reversed); the accuracy ones are
    last3_acc (holds), auc (underpowered), distribution_drop:2 (equivalent) and
    rounds_to_target (pending): 2 of 4. total_mb (reversed) and slot_norm (underpowered) are not
    accuracy claims."""
    claims = [("last3_acc", "holds"), ("auc", "underpowered"), ("distribution_drop:2", "equivalent"),
              ("rounds_to_target", "pending"), ("total_mb", "does not hold (reversed)"),
              ("slot_norm:4:16", "underpowered")]
    text = make_results.decided_text(claims)
    assert "3 of 6 (50%) of all claims" in text
    assert "2 of 4 (50%) of the accuracy claims" in text
    assert "0 of 0" in make_results.decided_text([("total_mb", "holds")])
