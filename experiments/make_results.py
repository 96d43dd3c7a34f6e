"""Aggregate the comparison runs into ``experiments/README.md`` and PNG plots.

Usage::

    python experiments/make_results.py [--results experiments/results] [--readme experiments/README.md]

Reads ``results/<comparison>/<label>[_<field><value>]_s<seed>/metrics.jsonl`` (one JSON line per
round, round -1 = before training; a run counts when its ``summary.json`` exists) and the
comparison's config module ``configs/<comparison>.py``. Nothing here names a method: the arms
(``METHODS``), seeds, sweep, target and claims all come from the config module.

Config contract (besides ``METHODS`` / ``SEEDS`` / ``SWEEP`` of ``run_comparison``):

* ``TARGET = {"fraction": f, "reference": label}`` (optional): per sweep value, the target
  accuracy is ``f`` x the mean over seeds of the reference arm's last-3 accuracy.
* ``CLAIMS = ({"claim": str, "arm": label, "ref": label, "metric": name, "direction": +1 | -1}, ...)``:
  the paper claims ``metric(arm)`` is higher (+1) / lower (-1) than ``metric(ref)``; evaluated
  separately for each sweep value.
* ``MARGINS = {metric: {"delta": d, "reason": str}, ...}`` (required with CLAIMS): the
  equivalence margin of every metric a claim uses, in the metric's units, with the reason for
  its size, declared in the config before the runs it judges (:func:`validate_config` refuses a
  claim whose metric has none).
* ``DIFFERENCES`` (optional): how our setting differs from the paper's, printed beside the verdicts.
* ``FINDINGS`` (optional): the reading of the finished runs (why a claim holds or fails, from the
  diagnostics on the page), printed after them; written by hand once the runs are in.

Metrics: see :data:`METRIC_NAMES` and :func:`metric_value`.

Verdict rules (:func:`judge_claim`), per claim and sweep value:

* Pairs are the seeds that finished in both arms; ``d_s = metric(arm, s) - metric(ref, s)``.
  We report n, every ``d_s``, their mean, sample sd (ddof=1) and the two-sided 95% t interval
  ``mean +- t(0.975, n-1) * sd / sqrt(n)``.
* "holds" when the whole interval lies on the claimed side of 0, "does not hold (reversed)"
  when it lies wholly on the other side.
* Otherwise (:func:`margin_verdict`), "equivalent" (within the metric's declared margin delta) when the
  two-sided 90% interval ``mean +- t(0.95, n-1) * sd / sqrt(n)`` lies inside ``(-delta, +delta)``:
  the two one-sided tests at level 0.05. Otherwise "underpowered", with the paired seeds needed
  ``n* = min {n >= 2 : t(0.95, n-1) * sd / sqrt(n) <= delta}`` (:func:`seeds_needed`: the n at
  which the 90% interval's half-width at the observed sd shrinks to delta), and beside it the
  same count for the margin the observed mean leaves, ``delta - |mean|`` (the seeds at which the
  verdict would be "equivalent" if mean and sd stayed as observed; none when ``|mean| >= delta``);
  no count is given when there are fewer than 2 pairs or the observed sd is 0. The order is deliberate: a difference
  the 95% interval decides is reported as holds / reversed even when it is also smaller than
  delta (a note says so).
* To-target metrics (a run may never reach the target), with "better" = the side the claim
  says is cheaper: if the better side never reached the target in some seed, the claim cannot
  hold: "does not hold" if the other side reached it in that seed, else "underpowered". If only
  the other side never reached it, its whole-run value (rounds run + 1, total MB, total sim s)
  is a bound substituted for it; the difference is marked (``≤`` / ``≥``) and biased against
  the claim, so it can still establish "holds" but never a reversal nor equivalence (then
  "underpowered"). A seed where neither side reached the target rules out equivalence too.
* A metric a run does not log (e.g. no ``global_slot_norm``) drops that pair, and the verdict
  text names the seeds.
* Cost metrics also show the ratio of means ``mean(ref) / mean(arm)`` over the pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_comparison import load_module, run_name, sweep_items  # noqa: E402

from fedlora_jax._atomic import atomic_write_bytes  # noqa: E402

COMPARISONS = ("byun_lee", "byun_lee_frozen_head", "hafl", "hafl_rank_skew", "hafl_llm", "fedara", "fedara_frozen_head",
               "fedara_prune", "legend", "legend_frozen_head", "hafl_llm_curve")
#: Pilots (issue 32): before a comparison is rebuilt in a new setting, does the setting leave the
#: adapters room? Each config's ``PILOT`` rule decides it (see :func:`pilot_rows`).
PILOTS = ("pilot_sst2", "pilot_agnews_frozen_head")
MB = 1e6
TO_TARGET = ("rounds_to_target", "mb_to_target", "sim_s_to_target")
TOTALS = ("total_mb", "total_sim_s", "total_energy_kj")
COST_METRICS = TO_TARGET + TOTALS
SCALAR_METRICS = ("initial_acc", "final_acc", "last3_acc", "best_acc", "auc", *COST_METRICS, "diagnostic_drop",
                  "global_budget")
#: Metrics with arguments: ``slot_norm:<lo>:<hi>``, ``distributed_acc:<rank>``, ``distribution_drop:<rank>``.
PARAM_METRICS = {"slot_norm": 2, "distributed_acc": 1, "distribution_drop": 1}
METRIC_NAMES = (*SCALAR_METRICS, "slot_norm:<lo>:<hi>", "distributed_acc:<rank>", "distribution_drop:<rank>")
DIGITS = {"rounds_to_target": 1, "mb_to_target": 2, "sim_s_to_target": 1, "total_mb": 2, "total_sim_s": 1,
          "global_budget": 1}
SLOT_BIN = 4
#: Metrics read from test accuracy (the "accuracy claims" of issue 32's goal that a third be decided);
#: the rest are costs (traffic, simulated time and energy) and mechanism diagnostics (slot norms).
ACCURACY_METRICS = ("initial_acc", "final_acc", "last3_acc", "best_acc", "auc", "rounds_to_target", "diagnostic_drop",
                    "distributed_acc", "distribution_drop")
#: Verdicts that answer the claim (everything but "underpowered" and "pending").
DECIDED = ("holds", "does not hold (reversed)", "does not hold", "equivalent")
#: Every verdict :func:`judge_claim` gives, in the order the overview counts them.
VERDICTS = ("holds", "does not hold (reversed)", "does not hold", "equivalent", "underpowered", "pending")
CI_LEVEL = 0.95
#: Level of the two-sided interval of the equivalence test: inside (-delta, +delta) = both
#: one-sided tests (TOST) at 1 - (1 + TOST_LEVEL) / 2 = 0.05.
TOST_LEVEL = 0.90
RULES = """## How the verdicts are computed

Each claim compares one metric of two arms, paired by seed (every arm of a seed samples the same
clients and holds the same data): `d_s = metric(arm, s) - metric(ref, s)` for the seeds that
finished in both, n of them. The table gives every `d_s`, their mean, the two-sided 95% t
interval `mean ± t(0.975, n-1) · sd / sqrt(n)` and the two-sided 90% interval
`mean ± t(0.95, n-1) · sd / sqrt(n)` (sd with ddof=1). Every claim ends in one of these verdicts,
decided in this order:

1. **holds**: the whole 95% interval is on the claimed side of 0; **does not hold (reversed)**:
   wholly on the other side. A decided difference that is also smaller than the margin says so
   in a note.
2. **equivalent within ±δ**: otherwise, when the whole 90% interval lies inside (-δ, +δ), where
   δ is the metric's equivalence margin, declared with its reason in the comparison's config
   (`MARGINS`; listed under each section's claims). These are the two one-sided tests at level
   0.05: no difference larger than δ either way.
3. **underpowered**: otherwise (or with fewer than 2 paired seeds), printed with the paired seeds
   needed: the smallest n ≥ 2 with `t(0.95, n-1) · sd / sqrt(n) ≤ δ` at the observed sd, i.e.
   the n at which the 90% interval's half-width shrinks to δ (t quantiles from scipy, as for the
   intervals). It is the count at which a mean difference of 0 would show equivalence; beside it,
   "k at the observed mean" is the same count for the margin the observed mean m leaves
   (`t(0.95, k-1) · sd / sqrt(k) ≤ δ - |m|`: the seeds at which the claim would end equivalent
   if m and sd stayed as observed), or "mean outside ±δ" when |m| ≥ δ (more seeds would then more
   likely end in holds / reversed). With fewer than 2 pairs or an observed sd of 0 there is no
   spread to size from, and the page says so instead of a number.

To-target metrics: if the arm the claim says is cheaper never reached the target in a seed, the
claim cannot hold (**does not hold** if the other arm reached it in that seed, **underpowered**
otherwise); if only the other arm never reached it, its whole-run value (rounds run + 1, total MB,
total simulated s) is substituted as a bound, the difference is marked `≤` / `≥`, and this bound
can support "holds" but never a reversal or equivalence. Cost metrics also show the ratio of means
(ref / arm, "2.4x less communication").
"""


# ----------------------------------------------------------------------------- per-run metrics

def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) of the non-None values; (nan, nan) if none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def eval_curve(rows: list[dict], x_key: str = "round") -> tuple[np.ndarray, np.ndarray]:
    """``(x, accuracy)`` at every evaluated row, starting with the pre-training row.

    ``x_key`` is ``"round"`` (round -1 plotted as 0, round r as r + 1) or a cumulative field
    such as ``"cum_bytes_up"`` / ``"cum_sim_time_s"`` (0 before training).
    """
    xs, ys = [], []
    for r in sorted(rows, key=lambda r: r["round"]):
        if "test_accuracy" not in r:
            continue
        if x_key == "round":
            xs.append(r["round"] + 1)
        else:
            xs.append(0.0 if r["round"] < 0 else r[x_key])
        ys.append(r["test_accuracy"])
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def first_reaching(rows: list[dict], target: float, key: str) -> float | None:
    """``rows[key]`` at the first trained round whose test accuracy is >= ``target`` (None if
    never reached). Rounds before training are ignored; ``key="round"`` gives round + 1."""
    for r in trained_rows(rows):
        if r.get("test_accuracy") is not None and r["test_accuracy"] >= target:
            return float(r["round"] + 1 if key == "round" else r[key])
    return None


def trained_rows(rows: list[dict]) -> list[dict]:
    """The rows of trained rounds (round >= 0), in round order."""
    return sorted((r for r in rows if r["round"] >= 0), key=lambda r: r["round"])


def trained_evals(rows: list[dict]) -> list[float]:
    """Test accuracies of the evaluated trained rounds, in round order."""
    return [r["test_accuracy"] for r in trained_rows(rows) if "test_accuracy" in r]


def last_row(rows: list[dict]) -> dict:
    """The row of the last trained round."""
    trained = trained_rows(rows)
    if not trained:
        raise ValueError("run has no trained round")
    return trained[-1]


def auc(rows: list[dict]) -> float | None:
    """Normalised area under accuracy vs round (x = round + 1, pre-training row at 0): trapezoid
    over the evaluated points divided by the x range, in accuracy units (None with < 2 points)."""
    x, y = eval_curve(rows, "round")
    if x.size < 2:
        return None
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


def whole_run_value(rows: list[dict], metric: str) -> float:
    """The bound substituted for a to-target metric of a run that never reached the target:
    rounds run + 1, total uplink MB or total simulated seconds."""
    last = last_row(rows)
    return {"rounds_to_target": float(len(trained_rows(rows)) + 1), "mb_to_target": last["cum_bytes_up"] / MB,
            "sim_s_to_target": float(last["cum_sim_time_s"])}[metric]


def parse_metric(metric: str) -> tuple[str, tuple[int, ...]]:
    """``(base name, integer arguments)`` of a metric name; ValueError for an unknown one."""
    base, *args = metric.split(":")
    if base in SCALAR_METRICS and not args:
        return base, ()
    if base in PARAM_METRICS and len(args) == PARAM_METRICS[base]:
        try:
            ints = tuple(int(a) for a in args)
        except ValueError:
            ints = None
        if ints is not None and (base != "slot_norm" or 0 <= ints[0] < ints[1]):
            return base, ints
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRIC_NAMES)} (slot_norm needs 0 <= lo < hi)")


def metric_value(rows: list[dict], metric: str, target: float | None = None) -> float | None:
    """One metric of one run (None when undefined: not logged, or the target never reached).

    initial_acc (the evaluation before training, round -1); final_acc / last3_acc (mean of the
    last three trained evaluations, fewer if fewer) / best_acc;
    auc (:func:`auc`); rounds_to_target (round + 1 of the first trained evaluation >= target),
    mb_to_target, sim_s_to_target (cumulative uplink MB / simulated s at that row); total_mb,
    total_sim_s, total_energy_kj (at the last row); slot_norm:lo:hi (sum of
    ``global_slot_norm[lo:hi]`` at the last row logging it); distributed_acc:r
    (``distributed_test_accuracy[r]`` of the last row), distribution_drop:r (final_acc minus it);
    diagnostic_drop (local minus after-aggregation accuracy of ``first_round_diagnostic``);
    global_budget (sum of ``global_ranks`` at the last row).
    """
    base, args = parse_metric(metric)
    evals = trained_evals(rows)
    if base == "initial_acc":
        return next((r["test_accuracy"] for r in rows if r["round"] < 0 and "test_accuracy" in r), None)
    if base in ("final_acc", "last3_acc", "best_acc"):
        if not evals:
            return None
        return {"final_acc": evals[-1], "last3_acc": float(np.mean(evals[-3:])), "best_acc": max(evals)}[base]
    if base == "auc":
        return auc(rows)
    if base in TO_TARGET:
        if target is None:
            raise ValueError(f"metric {metric!r} needs a target accuracy (TARGET in the config)")
        key = {"rounds_to_target": "round", "mb_to_target": "cum_bytes_up", "sim_s_to_target": "cum_sim_time_s"}[base]
        v = first_reaching(rows, target, key)
        return None if v is None else v / MB if base == "mb_to_target" else v
    last = last_row(rows)
    if base in TOTALS:
        key, scale = {"total_mb": ("cum_bytes_up", MB), "total_sim_s": ("cum_sim_time_s", 1.0),
                      "total_energy_kj": ("cum_energy_j", 1e3)}[base]
        return float(last[key]) / scale
    if base == "slot_norm":
        logged = [r["global_slot_norm"] for r in trained_rows(rows) if "global_slot_norm" in r]
        if not logged:
            return None
        lo, hi = args
        if hi > len(logged[-1]):
            raise ValueError(f"metric {metric!r}: global_slot_norm has only {len(logged[-1])} slots")
        return float(np.sum(logged[-1][lo:hi]))
    if base in ("distributed_acc", "distribution_drop"):
        acc = last.get("distributed_test_accuracy", {}).get(str(args[0]))
        if acc is None or base == "distributed_acc":
            return acc
        return evals[-1] - acc if evals else None
    if base == "diagnostic_drop":
        diag = next((r["first_round_diagnostic"] for r in rows if "first_round_diagnostic" in r), None)
        return None if diag is None else diag["local_accuracy"] - diag["after_aggregation_accuracy"]
    if base == "global_budget":
        return float(sum(last["global_ranks"].values())) if "global_ranks" in last else None
    raise AssertionError(base)


# ----------------------------------------------------------------------------- paired statistics

def paired_interval(diffs, level: float = CI_LEVEL) -> dict:
    """n, mean, sample sd (ddof=1) and the two-sided t interval of paired differences
    (sd / lo / hi None with fewer than 2 values; mean None with none)."""
    d = np.asarray(diffs, np.float64)
    n = int(d.size)
    if n < 2:
        return {"n": n, "mean": float(d[0]) if n else None, "sd": None, "lo": None, "hi": None}
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def interval_verdict(interval: dict, direction: int) -> str:
    """"holds" / "does not hold (reversed)" / "inconclusive" from the 95% interval's position
    (the first stage; :func:`margin_verdict` resolves "inconclusive")."""
    if interval["n"] < 2:
        return "inconclusive"
    if direction * interval["lo"] > 0 and direction * interval["hi"] > 0:
        return "holds"
    if direction * interval["lo"] < 0 and direction * interval["hi"] < 0:
        return "does not hold (reversed)"
    return "inconclusive"


def seeds_needed(sd: float | None, delta: float, level: float = TOST_LEVEL) -> int | None:
    """Smallest n >= 2 with ``t(0.5 + level / 2, n - 1) * sd / sqrt(n) <= delta``: the paired seeds
    at which the two-sided ``level`` interval's half-width, at the observed sd, shrinks to the
    margin (None when sd is None, i.e. fewer than 2 pairs, or 0: no spread to size from).

    It is the count at which a mean difference of 0 would be shown equivalent; with the observed
    mean m != 0 equivalence needs a half-width of delta - |m|, so more seeds.
    """
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta!r}")
    if sd is None or sd == 0:
        return None
    q = 0.5 + level / 2

    def half(n):
        return float(stats.t.ppf(q, n - 1)) * sd / math.sqrt(n)

    # t(q, n-1) > z(q), so no n below (z sd / delta)^2 qualifies: start there and walk up.
    n = max(2, math.ceil((float(stats.norm.ppf(q)) * sd / delta) ** 2))
    while half(n) > delta:
        n += 1
    return n


def margin_verdict(verdict: str, diffs, delta: float, *, equivalence_possible: bool = True) -> dict:
    """Second stage of a verdict: a first-stage "inconclusive" becomes "equivalent" when the 90%
    interval of ``diffs`` lies inside ``(-delta, +delta)`` (and ``equivalence_possible``: no
    censored pair), else "underpowered"; any other verdict is kept. Returns ``{"verdict",
    "tost" (the 90% :func:`paired_interval`), "delta", "seeds_needed" (:func:`seeds_needed` at
    the observed sd), "seeds_needed_at_mean" (the same for the margin left by the observed mean,
    ``delta - |mean|``; None when the mean is outside ``±delta``), "notes"}``."""
    tost = paired_interval(diffs, TOST_LEVEL)
    n, sd, mean = tost["n"], tost["sd"], tost["mean"]
    need = seeds_needed(sd, delta)
    at_mean = None if mean is None or abs(mean) >= delta else seeds_needed(sd, delta - abs(mean))
    inside = n >= 2 and -delta < tost["lo"] and tost["hi"] < delta
    notes = []
    if verdict == "inconclusive":
        verdict = "equivalent" if inside and equivalence_possible else "underpowered"
    if verdict == "underpowered":
        if n < 2:
            notes.append("fewer than 2 paired seeds: no spread to size the seeds needed from")
        elif sd == 0:
            notes.append("the observed sd is 0: no spread to size the seeds needed from")
        else:
            notes.append(f"{need} paired seeds would give a 90% interval of ±{_g(delta)} at the observed sd "
                         f"{_g(sd)} ({n} now)")
            if at_mean is not None:
                notes.append(f"with the observed mean {_g(mean)} the interval would lie inside ±{_g(delta)} at "
                             f"{'over 1000' if at_mean > 1000 else at_mean} paired seeds")
            else:
                notes.append(f"the mean difference {_g(mean)} is outside ±{_g(delta)}: more seeds would more "
                             "likely decide a direction than show equivalence")
    elif verdict in ("holds", "does not hold (reversed)") and inside and equivalence_possible:
        notes.append(f"the 90% interval is also inside ±{_g(delta)}: a difference smaller than the margin")
    return {"verdict": verdict, "tost": tost, "delta": delta, "seeds_needed": need,
            "seeds_needed_at_mean": at_mean, "notes": notes}


def _g(x: float) -> str:
    return f"{x:.4g}"


def claim_pairs(arm_runs: dict, ref_runs: dict, metric: str, target: float | None) -> list[dict]:
    """Per seed finished in both arms: ``{"seed", "arm", "ref"}`` metric values (None = undefined)."""
    seeds = sorted(set(arm_runs) & set(ref_runs))
    return [{"seed": s, "arm": metric_value(arm_runs[s], metric, target),
             "ref": metric_value(ref_runs[s], metric, target)} for s in seeds]


def judge_claim(pairs: list[dict], direction: int, metric: str, *, delta: float, arm_runs: dict | None = None,
                ref_runs: dict | None = None) -> dict:
    """Verdict of one claim from its per-seed pairs (rules in the module docstring).

    ``delta`` is the metric's equivalence margin (``MARGINS`` of the config). ``arm_runs`` /
    ``ref_runs`` (seed -> rows) are needed only for to-target metrics, for the whole-run bound of
    a censored run. Returns ``{"verdict", "notes", "interval", "tost", "delta", "seeds_needed",
    "seeds_needed_at_mean", "diffs", "ratio", "ratio_mark"}``: verdict one of :data:`VERDICTS`
    ("does not hold" only for to-target metrics, "pending" when there is no pair); ``interval``
    the 95% and ``tost`` the 90% :func:`paired_interval`; the seed counts as in
    :func:`margin_verdict`; ``diffs`` is ``[(seed, d, mark)]`` with mark "", "≤" or "≥" (the true
    difference is at most / at least d), or d None when the pair is unusable.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if not pairs:
        return {"verdict": "pending", "notes": ["no seed finished in both arms"], "interval": paired_interval([]),
                "tost": paired_interval([], TOST_LEVEL), "delta": delta, "seeds_needed": None,
                "seeds_needed_at_mean": None, "diffs": [], "ratio": None, "ratio_mark": ""}
    censorable = parse_metric(metric)[0] in TO_TARGET
    better, worse = ("arm", "ref") if direction < 0 else ("ref", "arm")
    used, diffs, notes = [], [], []
    better_missed = {True: [], False: []}  # other side reached it in that seed -> seeds
    undefined, bounded = [], []
    for p in pairs:
        a, r, mark = p["arm"], p["ref"], ""
        if censorable and p[better] is None:
            better_missed[p[worse] is not None].append(p["seed"])
            diffs.append((p["seed"], None, f"{better} never reached"))
            continue
        if censorable and p[worse] is None:
            runs = ref_runs if worse == "ref" else arm_runs
            if runs is None:
                raise ValueError("judge_claim needs arm_runs and ref_runs for a to-target metric")
            bound = whole_run_value(runs[p["seed"]], metric)
            a, r = (a, bound) if worse == "ref" else (bound, r)
            mark = "≤" if worse == "ref" else "≥"
            bounded.append(p["seed"])
        elif a is None or r is None:
            undefined.append(p["seed"])
            diffs.append((p["seed"], None, "undefined"))
            continue
        used.append((a, r))
        diffs.append((p["seed"], a - r, mark))
    interval = paired_interval([a - r for a, r in used])
    verdict = interval_verdict(interval, direction)
    if better_missed[True]:
        verdict = "does not hold"
        notes.append(f"the {better} never reached the target in seed(s) {_seeds(better_missed[True])}, "
                     f"where the {worse} did")
    if better_missed[False]:
        if verdict != "does not hold":
            verdict = "inconclusive"
        notes.append(f"neither arm reached the target in seed(s) {_seeds(better_missed[False])}")
    if bounded:
        notes.append(f"the {worse} never reached the target in seed(s) {_seeds(bounded)}: its whole-run value is "
                     "substituted (censored bound, against the claim)")
        if verdict == "does not hold (reversed)":
            verdict = "inconclusive"
            notes.append("a censored bound cannot establish a reversal")
    if undefined:
        notes.append(f"metric not logged in seed(s) {_seeds(undefined)} (pair dropped)")
    second = margin_verdict(verdict, [a - r for a, r in used], delta,
                            equivalence_possible=not (bounded or better_missed[False]))
    if (bounded or better_missed[False]) and second["verdict"] == "underpowered":
        notes.append("a censored or unreached seed rules out equivalence")
    verdict = second["verdict"]
    notes += second["notes"]
    ratio, ratio_mark = None, ""
    if parse_metric(metric)[0] in COST_METRICS and used:
        arm_mean, ref_mean = np.mean([a for a, _ in used]), np.mean([r for _, r in used])
        ratio = float(ref_mean / arm_mean) if arm_mean != 0 else None
        ratio_mark = ("≥" if worse == "ref" else "≤") if bounded else ""
    return {"verdict": verdict, "notes": notes, "interval": interval, "tost": second["tost"], "delta": delta,
            "seeds_needed": second["seeds_needed"], "seeds_needed_at_mean": second["seeds_needed_at_mean"],
            "diffs": diffs, "ratio": ratio, "ratio_mark": ratio_mark}


def _seeds(seeds) -> str:
    return ", ".join(str(s) for s in seeds)


def evaluate_claim(claim: dict, groups: dict, value, target: float | None, margins: dict) -> dict:
    """:func:`judge_claim` of one config claim at one sweep value with the config's ``MARGINS``
    ("pending" when an arm has not finished or the target is not yet derivable)."""
    arm_runs, ref_runs = groups.get((claim["arm"], value), {}), groups.get((claim["ref"], value), {})
    delta = margins[claim["metric"]]["delta"]
    if parse_metric(claim["metric"])[0] in TO_TARGET and target is None:
        return judge_claim([], claim["direction"], claim["metric"], delta=delta) | {
            "notes": ["no target accuracy yet (the reference arm has no finished run)"]}
    pairs = claim_pairs(arm_runs, ref_runs, claim["metric"], target)
    return judge_claim(pairs, claim["direction"], claim["metric"], delta=delta, arm_runs=arm_runs,
                       ref_runs=ref_runs)


def validate_config(module) -> None:
    """ValueError when TARGET, MARGINS or a CLAIMS entry is malformed: unknown keys, arms not in
    METHODS, unknown metric, bad direction, a to-target metric without TARGET, or a claimed metric
    without a margin (MARGINS entry with delta > 0 and a reason)."""
    target = getattr(module, "TARGET", None)
    if target is not None:
        if set(target) != {"fraction", "reference"} or target["reference"] not in module.METHODS:
            raise ValueError(f"TARGET must be {{'fraction', 'reference': a METHODS label}}, got {target!r}")
        if not 0 < target["fraction"] <= 1:
            raise ValueError(f"TARGET fraction must be in (0, 1], got {target['fraction']!r}")
    margins = getattr(module, "MARGINS", None)
    if getattr(module, "CLAIMS", ()) and not isinstance(margins, dict):
        raise ValueError("a config with CLAIMS must declare MARGINS = {metric: {'delta': d, 'reason': str}} "
                         f"(the equivalence margin of every claimed metric), got {margins!r}")
    for metric, margin in (margins or {}).items():
        try:
            parse_metric(metric)
        except ValueError as e:
            raise ValueError(f"MARGINS: {e}") from None
        if not isinstance(margin, dict) or set(margin) != {"delta", "reason"}:
            raise ValueError(f"MARGINS[{metric!r}] must be {{'delta': d, 'reason': str}}, got {margin!r}")
        delta = margin["delta"]
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < math.inf:
            raise ValueError(f"MARGINS[{metric!r}]: delta must be a finite number > 0, got {delta!r}")
        if not isinstance(margin["reason"], str) or not margin["reason"].strip():
            raise ValueError(f"MARGINS[{metric!r}]: reason must be a non-empty string saying why delta is "
                             f"{delta!r}")
    margins = margins or {}
    for claim in getattr(module, "CLAIMS", ()):
        name = claim.get("claim", claim)
        if set(claim) != {"claim", "arm", "ref", "metric", "direction"}:
            raise ValueError(f"claim {name!r}: keys must be claim, arm, ref, metric, direction; got {sorted(claim)}")
        for side in ("arm", "ref"):
            if claim[side] not in module.METHODS:
                raise ValueError(f"claim {name!r}: {side} {claim[side]!r} is not in METHODS {sorted(module.METHODS)}")
        try:
            base, _ = parse_metric(claim["metric"])
        except ValueError as e:
            raise ValueError(f"claim {name!r}: {e}") from None
        if claim["direction"] not in (1, -1):
            raise ValueError(f"claim {name!r}: direction must be +1 or -1, got {claim['direction']!r}")
        if base in TO_TARGET and target is None:
            raise ValueError(f"claim {name!r}: metric {claim['metric']!r} needs TARGET in the config")
        if claim["metric"] not in margins:
            raise ValueError(f"claim {name!r}: no equivalence margin for metric {claim['metric']!r}; declare "
                             f"MARGINS[{claim['metric']!r}] = {{'delta': ..., 'reason': ...}} in the config "
                             "(in the metric's units, fixed before the runs)")


# ----------------------------------------------------------------------------- loading

def finished_runs(results: Path, name: str, module) -> dict:
    """``{(label, sweep_value, seed): run directory}`` of the config's runs whose summary.json
    exists (directories of arms no longer in METHODS are ignored)."""
    out = {}
    for field, value in sweep_items(module):
        for label in module.METHODS:
            for seed in module.SEEDS:
                d = results / name / run_name(label, seed, field, value)
                if (d / "summary.json").exists():
                    out[(label, value, seed)] = d
    return out


def load_comparison(results: Path, name: str, config_dir: Path):
    """``(module, {(label, sweep_value): {seed: rows}})`` for the runs that finished."""
    module = load_module(config_dir / f"{name}.py")
    groups = {}
    for (label, value, seed), d in finished_runs(results, name, module).items():
        groups.setdefault((label, value), {})[seed] = read_jsonl(d / "metrics.jsonl")
    return module, groups


def read_partition(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(label names, hist [K, C])`` from a run's ``partition.txt`` (the driver's per-client table:
    a header ``client size <names...>``, a rule, one row per client, a summary line)."""
    lines = Path(path).read_text().splitlines()
    head = lines[0].split()
    if head[:2] != ["client", "size"] or len(head) < 3:
        raise ValueError(f"{path}: not a partition table (header {lines[0]!r})")
    hist = []
    for ln in lines[2:]:
        cells = ln.split()
        if len(cells) != len(head) or not all(c.isdigit() for c in cells):
            break
        if int(cells[0]) != len(hist):
            raise ValueError(f"{path}: client rows out of order at {ln!r}")
        hist.append([int(c) for c in cells[2:]])
    if not hist:
        raise ValueError(f"{path}: no client rows")
    return head[2:], np.asarray(hist, np.int64)


def load_partitions(results: Path, name: str, module) -> dict:
    """``{(label, sweep_value, seed): (label names, hist [K, C])}`` of the finished runs that kept
    their ``partition.txt``."""
    return {key: read_partition(d / "partition.txt")
            for key, d in finished_runs(results, name, module).items() if (d / "partition.txt").exists()}


def wall_minutes(results: Path, name: str, module) -> float:
    """Sum of the finished runs' measured ``wall_s`` (summary.json), in minutes."""
    dirs = finished_runs(results, name, module).values()
    return sum(json.loads((d / "summary.json").read_text())["wall_s"] for d in dirs) / 60


def target_accuracy(module, groups: dict, value) -> dict | None:
    """``{"target", "reference", "fraction", "ref_last3", "n"}`` at one sweep value (None without
    TARGET or when the reference arm has no finished run there)."""
    spec = getattr(module, "TARGET", None)
    runs = groups.get((spec["reference"], value)) if spec else None
    if not runs:
        return None
    last3 = [metric_value(r, "last3_acc") for r in runs.values()]
    if any(v is None for v in last3):
        raise ValueError(f"reference arm {spec['reference']!r} has a run without a trained evaluation")
    ref = float(np.mean(last3))
    return {"target": spec["fraction"] * ref, "reference": spec["reference"], "fraction": spec["fraction"],
            "ref_last3": ref, "n": len(last3)}


def identical_groups(groups: dict) -> list[tuple]:
    """Pairs of group keys whose metrics (ignoring wall time) are identical in every seed."""
    def strip(runs):
        return {s: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows] for s, rows in runs.items()}

    keys = list(groups)
    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
            if a[1] == b[1] and strip(groups[a]) == strip(groups[b])]


# ----------------------------------------------------------------------------- formatting

def fmt(ms, digits=3, scale=1.0):
    """``"m ± s"`` of a (mean, std) pair, "n/a" when the mean is missing."""
    m, s = ms
    if m is None or math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _num(x, digits=3, mark="") -> str:
    return "n/a" if x is None else f"{mark}{x:+.{digits}f}"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def arms_table(sub: dict, target: float | None) -> str:
    """Per arm, mean ± sd over seeds of the accuracy, AUC, to-target and total cost metrics."""
    head = ["arm", "seeds", "initial acc", "final acc", "last-3 acc", "AUC", "rounds to target (reached)",
            "uplink MB to target", "sim s to target", "total uplink MB", "total sim s", "energy kJ"]
    rows = []
    for (label, _), runs in sub.items():
        def col(metric, digits=3):
            return fmt(mean_std([metric_value(r, metric, target) for r in runs.values()]), digits)
        row = [label, str(len(runs)), col("initial_acc"), col("final_acc"), col("last3_acc"), col("auc")]
        if target is None:
            row += ["n/a", "n/a", "n/a"]
        else:
            reached = sum(metric_value(r, "rounds_to_target", target) is not None for r in runs.values())
            row += [f"{col('rounds_to_target', 1)} ({reached}/{len(runs)})", col("mb_to_target", 2),
                    col("sim_s_to_target", 1)]
        row += [col("total_mb", 2), col("total_sim_s", 1), col("total_energy_kj", 3)]
        rows.append(row)
    return _md_table(head, rows)


def diagnostic_tables(sub: dict, partitions: dict | None = None) -> list[str]:
    """Markdown tables of the diagnostics the runs logged (each only when present);
    ``partitions`` as from :func:`load_partitions`."""
    partitions = partitions or {}
    names = next(iter(partitions.values()))[0] if partitions else None
    out = class_accuracy_table(sub, names) + rank_share_table(sub, partitions)
    diag = {label: [next((r["first_round_diagnostic"] for r in rows if "first_round_diagnostic" in r), None)
                    for rows in runs.values()] for (label, _), runs in sub.items()}
    if any(d is not None for ds in diag.values() for d in ds):
        rows = []
        for label, ds in diag.items():
            ds = [d for d in ds if d is not None]
            if ds:
                loc = [d["local_accuracy"] for d in ds]
                aft = [d["after_aggregation_accuracy"] for d in ds]
                rows.append([label, str(len(ds)), fmt(mean_std(loc)), fmt(mean_std(aft)),
                             fmt(mean_std([a - b for a, b in zip(loc, aft, strict=True)]))])
        out += ["First-round diagnostic (the highest-rank participating client's accuracy before and after "
                "the first aggregation):", "",
                _md_table(["arm", "seeds", "local acc", "after aggregation", "drop"], rows), ""]
    norms = {label: [[r["global_slot_norm"] for r in trained_rows(rows) if "global_slot_norm" in r]
                     for rows in runs.values()] for (label, _), runs in sub.items()}
    width = max((len(n[-1]) for ns in norms.values() for n in ns if n), default=0)
    if width:
        bins = [(lo, min(lo + SLOT_BIN, width)) for lo in range(0, width, SLOT_BIN)]
        rows = []
        for label, ns in norms.items():
            ns = [n for n in ns if n]
            for when, idx in (("first eval", 0), ("last eval", -1)):
                if ns:
                    rows.append([label, when] + [fmt(mean_std([float(np.sum(n[idx][lo:hi])) for n in ns]))
                                                 for lo, hi in bins])
        out += ["Global slot norm (sum over modules of each rank slot's norm; mean ± sd over seeds):", "",
                _md_table(["arm", "when"] + [f"slots {lo}-{hi - 1}" for lo, hi in bins], rows), ""]
    dist = {label: [last_row(rows).get("distributed_test_accuracy") for rows in runs.values()]
            for (label, _), runs in sub.items()}
    ranks = sorted({int(k) for ds in dist.values() for d in ds if d for k in d})
    if ranks:
        rows = []
        for (label, _), runs in sub.items():
            if not any(dist[label]):
                continue
            cells = []
            for rank in ranks:
                acc = [metric_value(r, f"distributed_acc:{rank}") for r in runs.values()]
                drop = [metric_value(r, f"distribution_drop:{rank}") for r in runs.values()]
                cells.append(f"{fmt(mean_std(acc))} (drop {fmt(mean_std(drop))})")
            rows.append([label] + cells)
        out += ["Accuracy of the model a client of each rank receives (drop = global final accuracy minus it):", "",
                _md_table(["arm"] + [f"rank {r}" for r in ranks], rows), ""]
    out += plan_table(sub)
    return out + allocation_table(sub)


def layer_of(module_key: str) -> int:
    """The layer index in a module key such as ``layer.3.query`` or ``model.layers.3.self_attn.q_proj``."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_key)
    if m is None:
        raise ValueError(f"module key {module_key!r} has no layer index")
    return int(m.group(1))


def allocation_table(sub: dict) -> list[str]:
    """Per arm whose runs logged a non-empty ``global_ranks`` (the server's allocation), at the
    last trained round (mean over seeds): active triplets per layer from the bottom up, the
    total budget, the modules pruned whole (rank 0), the lowest layer any client trains
    (``grad_cut``: no backward pass below it) and the slowest sampled client's simulated round
    time. This is what the time and energy of a pruning method come from."""
    rows = []
    for (label, _), runs in sub.items():
        lasts = [next((r for r in reversed(trained_rows(rr)) if "global_ranks" in r), None) for rr in runs.values()]
        lasts = [r for r in lasts if r is not None and sum(r["global_ranks"].values()) > 0]
        if not lasts:
            continue
        layers = sorted({layer_of(k) for k in lasts[0]["global_ranks"]})
        per_layer = [[sum(v for k, v in r["global_ranks"].items() if layer_of(k) == i) for i in layers] for r in lasts]
        rows.append([label, str(len(lasts)), " ".join(f"{x:.1f}" for x in np.mean(per_layer, axis=0)),
                     fmt(mean_std([sum(r["global_ranks"].values()) for r in lasts]), 1),
                     fmt(mean_std([sum(v == 0 for v in r["global_ranks"].values()) for r in lasts]), 1),
                     fmt(mean_std([min(r["grad_cut"]) for r in lasts if "grad_cut" in r]), 1),
                     fmt(mean_std([max(r["client_sim_time_s"]) for r in lasts if "client_sim_time_s" in r]), 2)])
    if not rows:
        return []
    return ["Final allocation (last round; mean ± sd over seeds): active triplets per layer from the bottom up, "
            "their sum, the modules pruned whole, the lowest layer any client trains (no backward pass below it) "
            "and the slowest sampled client's simulated round time:", "",
            _md_table(["arm", "seeds", "triplets per layer", "global budget", "pruned modules",
                       "lowest trained layer", "slowest client s"], rows), ""]


def class_accuracy_table(sub: dict, names: list[str] | None = None) -> list[str]:
    """Per arm, the final global model's accuracy on each class (``test_class_accuracy`` of the
    last evaluated row; mean ± sd over seeds), when the runs logged it."""
    rows = []
    for (label, _), runs in sub.items():
        finals = [next((r["test_class_accuracy"] for r in reversed(trained_rows(rr)) if "test_class_accuracy" in r),
                       None) for rr in runs.values()]
        finals = [f for f in finals if f is not None]
        if finals:
            width = len(finals[0])
            rows.append([label, str(len(finals))] + [fmt(mean_std([f[k] for f in finals])) for k in range(width)])
    if not rows:
        return []
    width = len(rows[0]) - 2
    names = names if names is not None and len(names) == width else [f"class {k}" for k in range(width)]
    return ["Final accuracy per class (global model; mean ± sd over seeds):", "",
            _md_table(["arm", "seeds"] + list(names), rows), ""]


def client_ranks_seen(rows: list[dict]) -> dict[int, int]:
    """``{client: rank}``: each client's largest ``active_ranks`` over the modules in the first
    trained round it took part in."""
    out = {}
    for r in trained_rows(rows):
        if "active_ranks" not in r or "clients" not in r:
            continue
        for i, c in enumerate(r["clients"]):
            if c not in out:
                out[c] = int(max(v[i] for v in r["active_ranks"].values()))
    return out


def ranks_differ_within_a_round(rows: list[dict]) -> bool:
    """Whether some trained round gave its clients different ranks (heterogeneous clients), as
    opposed to one rank for everyone that only changes between rounds (FedARA's schedule)."""
    return any(len({max(v[i] for v in r["active_ranks"].values()) for i in range(len(r["clients"]))}) > 1
               for r in trained_rows(rows) if "active_ranks" in r and "clients" in r)


def top_rank_share(rows: list[dict], hist: np.ndarray) -> tuple[int, list[int], np.ndarray] | None:
    """``(rank, clients, share [C])``: the clients at the highest rank seen and the share of each
    class's training examples they hold (None when every client seen has one rank, no round gave
    its clients different ranks, or a client never took part)."""
    ranks = client_ranks_seen(rows)
    if len(ranks) != len(hist) or len(set(ranks.values())) < 2 or not ranks_differ_within_a_round(rows):
        return None
    top = max(ranks.values())
    clients = sorted(c for c, r in ranks.items() if r == top)
    return top, clients, hist[clients].sum(axis=0) / np.maximum(hist.sum(axis=0), 1)


def rank_share_table(sub: dict, partitions: dict) -> list[str]:
    """Per arm and seed, the share of each class held by the highest-rank clients (what their
    high rank components are trained on), when the runs kept their partition tables."""
    cells, names = {}, None   # (seed, rank, clients, shares) -> arms with that row
    for (label, value), runs in sub.items():
        for seed, rr in sorted(runs.items()):
            part = partitions.get((label, value, seed))
            got = None if part is None else top_rank_share(rr, part[1])
            if got is not None:
                names = part[0]
                top, clients, share = got
                key = (seed, str(top), " ".join(map(str, clients)), tuple(f"{x:.2f}" for x in share))
                cells.setdefault(key, []).append(label)
    if not cells:
        return []
    rows = [[", ".join(arms), str(seed), top, clients, *share]
            for (seed, top, clients, share), arms in sorted(cells.items(), key=lambda kv: kv[0][0])]
    return ["Share of each class's training examples held by the highest-rank clients (rank and clients from "
            "the first round each client took part in):", "",
            _md_table(["arms", "seed", "rank", "clients"] + list(names), rows), ""]


def device_plans(rows: list[dict]) -> dict[str, tuple[int, ...]]:
    """``{device type: ranks per layer, bottom to top}`` of the first trained round: each layer's
    largest ``active_ranks`` over its modules, for the first sampled client of each device type
    (``{}`` when the run did not log ``client_device``)."""
    first = next(iter(trained_rows(rows)), {})
    if "client_device" not in first or "active_ranks" not in first:
        return {}
    layers: dict[int, list[list[float]]] = {}
    for key, per_client in first["active_ranks"].items():
        layers.setdefault(layer_of(key), []).append(per_client)
    plans = {}
    for c, device in enumerate(first["client_device"]):
        if device not in plans:
            plans[device] = tuple(int(max(m[c] for m in layers[i])) for i in sorted(layers))
    return plans


def plan_table(sub: dict) -> list[str]:
    """The adapter plan of each arm per device type in the first round (seed of the first finished
    run; depth = layers with an adapter), when some arm's plan differs between device types."""
    rows, differs = [], False
    for (label, _), runs in sub.items():
        plans = device_plans(runs[min(runs)])
        differs |= len(set(plans.values())) > 1
        for device, ranks in plans.items():
            rows.append([label, device, str(sum(r > 0 for r in ranks)), " ".join(map(str, ranks))])
    if not differs:
        return []
    return ["Adapter plan in the first round, per device type (ranks per layer from the bottom to the top, "
            "the largest over the layer's modules):", "",
            _md_table(["arm", "device", "depth", "ranks per layer"], rows), ""]


def ci_text(claim: dict, res: dict) -> str:
    """``"mean [lo, hi]"`` of a judged claim's paired differences (``(n = 1)``, ``n/a``, ``(censored)``)."""
    digits = DIGITS.get(parse_metric(claim["metric"])[0], 3)
    iv = res["interval"]
    ci = ("n/a" if iv["mean"] is None else f"{_num(iv['mean'], digits)} (n = 1)" if iv["lo"] is None
          else f"{_num(iv['mean'], digits)} [{_num(iv['lo'], digits + 1)}, {_num(iv['hi'], digits + 1)}]")
    return f"{ci} (censored)" if any(mark in ("≤", "≥") for _, _, mark in res.get("diffs", ())) else ci


def tost_text(claim: dict, res: dict) -> str:
    """``"[lo, hi]"`` of a judged claim's 90% interval (``n/a`` with fewer than 2 pairs)."""
    digits = DIGITS.get(parse_metric(claim["metric"])[0], 3)
    iv = res["tost"]
    return "n/a" if iv["lo"] is None else f"[{_num(iv['lo'], digits + 1)}, {_num(iv['hi'], digits + 1)}]"


def verdict_text(res: dict) -> str:
    """The verdict as printed: ``equivalent within ±delta``, ``underpowered (n* seeds needed)``."""
    if res["verdict"] == "equivalent":
        return f"equivalent within ±{_g(res['delta'])}"
    if res["verdict"] == "underpowered":
        need, at_mean = res["seeds_needed"], res["seeds_needed_at_mean"]
        if need is None:
            return "underpowered (seeds needed: n/a)"
        mean = ("mean outside ±δ" if at_mean is None else "over 1000 at the observed mean" if at_mean > 1000
                else f"{at_mean} at the observed mean")
        return f"underpowered ({need} seeds needed; {mean})"
    return res["verdict"]


def claims_block(claims, results: list[dict], margins: dict | None = None) -> list[str]:
    """The claims table, one bullet per claim and the margins of the metrics they use."""
    rows, bullets = [], []
    for claim, res in zip(claims, results, strict=True):
        digits = DIGITS.get(parse_metric(claim["metric"])[0], 3)
        per_seed = ", ".join(f"s{s}: {_num(d, digits, mark)}" if d is not None else f"s{s}: n/a ({mark})"
                             for s, d, mark in res["diffs"]) or "–"
        iv = res["interval"]
        ci = ci_text(claim, res)
        ratio = "" if res["ratio"] is None else f"{res['ratio_mark']}{res['ratio']:.2f}x"
        side = "higher" if claim["direction"] > 0 else "lower"
        rows.append([claim["claim"], f"`{claim['arm']}` − `{claim['ref']}`", f"`{claim['metric']}` ({side})",
                     per_seed, ci, f"{tost_text(claim, res)} (±{_g(res['delta'])})", ratio,
                     f"**{verdict_text(res)}**"])
        nums = "" if iv["mean"] is None else f"mean difference {ci} over {iv['n']} paired seed(s)"
        nums += f", 90% interval {tost_text(claim, res)}" if res["tost"]["lo"] is not None else ""
        nums += f", ref/arm ratio of means {ratio}" if ratio else ""
        text = "; ".join(x for x in [nums, *res["notes"]] if x)
        bullets.append(f"- **{claim['claim']}** — {verdict_text(res)}: {text}.")
    table = _md_table(["claim", "arm − ref", "metric (claimed)", "per-seed differences", "mean [95% CI]",
                       "90% CI (margin)", "ratio of means (ref/arm)", "verdict"], rows)
    used = dict.fromkeys(c["metric"] for c in claims)
    margin_lines = [f"- `{m}`: ±{_g(margins[m]['delta'])}. {margins[m]['reason']}" for m in used
                    if margins and m in margins]
    if margin_lines:
        margin_lines = ["Equivalence margins (declared in the config):", "", *margin_lines, ""]
    return [table, "", *bullets, "", *margin_lines]


def plot_groups(groups: dict, title: str, path: Path) -> None:
    """Accuracy vs round / cumulative uplink MB / cumulative simulated time: mean over seeds with a
    ±1 sd band (no band with one seed). ``groups``: ``{(label, value): {seed: rows}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (label, _), runs in groups.items():
        for ax, key, xl in zip(axes, ("round", "cum_bytes_up", "cum_sim_time_s"),
                               ("round", "cumulative uplink (MB)", "cumulative simulated time (s)"), strict=True):
            x, m, s = mean_curve([eval_curve(r, key) for r in runs.values()])
            if key == "cum_bytes_up":
                x = x / MB
            ax.plot(x, m, marker="o", ms=3, label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(x, m - s, m + s, alpha=0.2)
            ax.set_xlabel(xl)
            ax.set_ylabel("test accuracy")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean x, mean y and std y over seeds of curves evaluated at the same rounds (truncated to
    the shortest; std 0 for one curve)."""
    n = min(len(c[0]) for c in curves)
    xs = np.stack([c[0][:n] for c in curves])
    ys = np.stack([c[1][:n] for c in curves])
    sd = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(n)
    return xs.mean(axis=0), ys.mean(axis=0), sd


# ----------------------------------------------------------------------------- page

def value_block(name: str, module, groups: dict, field: str | None, value, plots: Path,
                partitions: dict | None = None) -> list[str]:
    """The part of a section for one sweep value (or the whole comparison without a sweep)."""
    sub = {k: g for k, g in groups.items() if k[1] == value}
    out = [] if field is None else [f"### {field} = {value}", ""]
    if not sub:
        return out + ["No finished runs.", ""]
    tgt = target_accuracy(module, groups, value)
    target = None if tgt is None else tgt["target"]
    if tgt is not None:
        out += [f"Target accuracy: {tgt['target']:.3f} = {tgt['fraction']:.2f} x the mean last-3 accuracy "
                f"({tgt['ref_last3']:.3f}, {tgt['n']} seed(s)) of the reference arm `{tgt['reference']}`.", ""]
    elif getattr(module, "TARGET", None):
        out += [f"Target accuracy: pending (reference arm `{module.TARGET['reference']}` has no finished run).", ""]
    out += [arms_table(sub, target), ""]
    out += diagnostic_tables(sub, partitions)
    fname = f"{name}{'' if field is None else f'_{field}{value}'}.png"
    plot_groups(sub, f"{name}{'' if field is None else f' ({field}={value})'}", plots / fname)
    out += [f"![{fname}](results/plots/{fname})", ""]
    claims = tuple(getattr(module, "CLAIMS", ()))
    if claims:
        margins = module.MARGINS
        out += claims_block(claims, [evaluate_claim(c, groups, value, target, margins) for c in claims], margins)
    return out


def section(name: str, results: Path, config_dir: Path, plots: Path) -> str:
    """The README section of one comparison."""
    module, groups = load_comparison(results, name, config_dir)
    validate_config(module)
    if not groups:
        return f"## {name}\n\nNo finished runs.\n"
    doc = (module.__doc__ or "").strip()
    out = [f"## {name}", "", doc.split("\n\n")[0], "",
           f"Runs: {sum(len(v) for v in groups.values())}, measured CPU wall time "
           f"{wall_minutes(results, name, module):.1f} min.", ""]
    partitions = load_partitions(results, name, module)
    for field, value in sweep_items(module):
        out += value_block(name, module, groups, field, value, plots, partitions)
    if getattr(module, "DIFFERENCES", None):
        out += [f"Differences from the paper: {module.DIFFERENCES}", ""]
    if getattr(module, "FINDINGS", None):
        out += [f"Reading the numbers: {module.FINDINGS}", ""]
    for a, b in identical_groups(groups):
        out += [f"Note: `{a[0]}` and `{b[0]}`{'' if a[1] is None else f' ({a[1]})'} produced byte-identical "
                "metrics in every seed (the comparison between them is empty).", ""]
    return "\n".join(out) + "\n"


def decided_text(claims: list[tuple[str, str]]) -> str:
    """``claims``: ``[(metric, verdict), ...]``. One sentence: how many claims are decided (holds,
    reversed, does not hold or equivalent), over all claims and over the accuracy claims
    (:data:`ACCURACY_METRICS`), each with its share."""
    def share(pairs):
        k = sum(v in DECIDED for _, v in pairs)
        return f"{k} of {len(pairs)} ({100 * k / len(pairs):.0f}%)" if pairs else "0 of 0"
    acc = [(m, v) for m, v in claims if parse_metric(m)[0] in ACCURACY_METRICS]
    return (f"Decided (holds, reversed, does not hold or equivalent): {share(claims)} of all claims, "
            f"{share(acc)} of the accuracy claims (metrics read from test accuracy).")


def verdict_overview(results: Path, config_dir: Path, names=COMPARISONS) -> str:
    """One table of every claim's verdict over the comparisons with results (details in each
    comparison's section)."""
    rows, judged = [], []
    for name in names:
        if not (results / name).is_dir():
            continue
        module, groups = load_comparison(results, name, config_dir)
        validate_config(module)
        for field, value in sweep_items(module):
            tgt = target_accuracy(module, groups, value)
            for claim in getattr(module, "CLAIMS", ()):
                res = evaluate_claim(claim, groups, value, None if tgt is None else tgt["target"], module.MARGINS)
                setting = "" if field is None else f"{field} = {value}"
                rows.append([name, setting, claim["claim"], f"`{claim['metric']}`", ci_text(claim, res),
                             tost_text(claim, res), f"±{_g(res['delta'])}", str(res["interval"]["n"]),
                             f"**{verdict_text(res)}**"])
                judged.append((claim["metric"], res["verdict"]))
    if not rows:
        return ""
    counts = {v: sum(verdict == v for _, verdict in judged) for v in VERDICTS}
    tally = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    return "\n".join(["## Verdicts at a glance", "",
                      "Every claim of every comparison (arm − ref, paired by seed; the sections below give the "
                      "per-seed differences, the diagnostics, the reason for each margin and where the setting "
                      "differs from the paper).", "",
                      f"{len(rows)} claims: {tally}. {decided_text(judged)}", "",
                      _md_table(["comparison", "setting", "claim", "metric", "mean difference [95% CI]", "90% CI",
                                 "margin", "seeds", "verdict"], rows), ""])


def pilot_rows(module, groups: dict) -> tuple[list[dict], bool | None]:
    """Per seed of a pilot: the arm's metric, the control's (an arm, or ``"initial"``: the arm's
    own evaluation before training) and the gain; and the decision: ``False`` as soon as a seed
    gains less than ``PILOT["min_gain"]``, ``True`` when every seed of ``SEEDS`` has finished
    and gains at least that, else ``None`` (pending)."""
    rule = module.PILOT
    arm = groups.get((rule["arm"], None), {})
    rows = []
    for seed in sorted(arm):
        if rule["control"] == "initial":
            ctrl = metric_value(arm[seed], "initial_acc")
        elif seed in groups.get((rule["control"], None), {}):
            ctrl = metric_value(groups[(rule["control"], None)][seed], rule["metric"])
        else:
            continue
        val = metric_value(arm[seed], rule["metric"])
        rows.append({"seed": seed, "arm": val, "control": ctrl, "gain": val - ctrl})
    if any(r["gain"] < rule["min_gain"] for r in rows):
        return rows, False
    return rows, (True if len(rows) == len(module.SEEDS) else None)


def pilot_section(names, results: Path, config_dir: Path) -> str:
    """The pilots' table: per pilot and seed, arm vs control and the keep / drop decision."""
    out = []
    for name in names:
        if not (results / name).is_dir():
            continue
        module, groups = load_comparison(results, name, config_dir)
        rule = module.PILOT
        rows, keep = pilot_rows(module, groups)
        ctrl = "its own accuracy before training" if rule["control"] == "initial" else f"`{rule['control']}`"
        decision = {True: "**keep** (the gain reaches the bar in every seed)",
                    False: "**drop** (a seed falls short of the bar)",
                    None: "pending (not every seed has finished)"}[keep]
        other = [f"`{label}` {fmt(mean_std([metric_value(r, rule['metric']) for r in runs.values()]))}"
                 for (label, _), runs in sorted(groups.items()) if label not in (rule["arm"], rule["control"])]
        out += [f"### `{name}`", "", (module.__doc__ or "").strip().splitlines()[0], "",
                f"Rule: `{rule['arm']}` minus {ctrl} on `{rule['metric']}`, at least {rule['min_gain']} in every "
                f"seed. Decision: {decision}. CPU time of the finished runs: "
                f"{wall_minutes(results, name, module):.1f} min.", "",
                _md_table(["seed", f"`{rule['arm']}`", "control", "gain"],
                          [[str(r["seed"]), f"{r['arm']:.3f}", f"{r['control']:.3f}", _num(r["gain"])] for r in rows]),
                ""]
        if other:
            out += ["Other arms (mean ± sd over seeds): " + ", ".join(other) + ".", ""]
        if getattr(module, "FINDINGS", None):
            out += [f"Reading: {module.FINDINGS}", ""]
    if not out:
        return ""
    return "\n".join(["## Pilots: does a setting leave the adapters room?", "",
                      "Before a comparison is rebuilt in a new setting (issue 32), a pilot runs the plainest LoRA "
                      "arm against the control in 2 seeds; the setting is kept only if the adapters add at least "
                      "0.05 accuracy (more than 3 binomial standard errors of the test set) in every seed.", "",
                      *out])


def write_page(results: Path, configs: Path, readme: Path, preamble: Path, names=COMPARISONS,
               pilots=PILOTS) -> str:
    """Render the page (preamble, rules, overview, one section per comparison with results), write
    it atomically to ``readme`` and delete the PNGs in ``results/plots`` the page no longer shows
    (a plot of a removed arm or sweep value would otherwise sit there as if current). Returns it."""
    parts = [preamble.read_text() if preamble.exists() else "# Results\n", RULES,
             verdict_overview(results, configs, names)]
    for name in names:
        if (results / name).is_dir():
            parts.append(section(name, results, configs, results / "plots"))
    parts.append(pilot_section(pilots, results, configs))
    page = "\n".join(parts)
    shown = set(re.findall(r"\(results/plots/([^)\s]+\.png)\)", page))
    for png in sorted((results / "plots").glob("*.png")):
        if png.name not in shown:
            png.unlink()
            print(f"removed stale plot {png}")
    atomic_write_bytes(readme, page.encode())
    return page


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--configs", default=str(HERE / "configs"))
    p.add_argument("--readme", default=str(HERE / "README.md"))
    p.add_argument("--preamble", default=str(HERE / "results_preamble.md"))
    args = p.parse_args(argv)
    write_page(Path(args.results), Path(args.configs), Path(args.readme), Path(args.preamble))
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
