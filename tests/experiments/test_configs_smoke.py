"""Experiment configs load, their methods build valid configs, the smoke variants run end to
end (slow + smoke). make_results' own tests are in test_make_results.py."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from helpers.modules import import_file

from fedlora_jax.driver.config import ALGORITHMS, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "experiments" / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
#: Single-run configs (no METHODS / SEEDS of run_comparison).
STANDALONE = ("quickstart", "llm_shakespeare")
COMPARISONS = [p for p in CONFIGS if p.stem not in STANDALONE]


run_comparison = import_file(ROOT / "experiments" / "run_comparison.py", "run_comparison_under_test")
make_results = import_file(ROOT / "experiments" / "make_results.py", "make_results_under_test")


def test_comparison_configs_exist():
    assert {p.stem for p in COMPARISONS} >= {"byun_lee", "hafl", "fedara", "legend"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("variant", ["full", "smoke"])
def test_config_loads(path, variant):
    cfg = load_config(path, variant=variant)
    assert isinstance(cfg, ExperimentConfig)
    if variant == "smoke":
        # classification as generation needs room for its prompt template (29 SmolLM2 tokens)
        assert cfg.rounds <= 2 and cfg.max_length <= (32 if cfg.task == "cls_generation" else 16)
        assert cfg.local_steps <= 2


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.stem)
def test_every_method_builds_a_valid_config(path):
    module = run_comparison.load_module(path)
    # a pilot (issue 32) runs 2 seeds and states its keep-or-drop rule; a comparison 3 or more
    if path.stem.startswith("pilot_"):
        assert tuple(module.SEEDS) == (0, 1) and set(module.PILOT) == {"arm", "control", "metric", "min_gain"}
        assert module.PILOT["arm"] in module.METHODS
        assert module.PILOT["control"] in (*module.METHODS, "initial")
    else:
        assert tuple(module.SEEDS)[:3] == (0, 1, 2)
    for variant in ("full", "smoke"):
        runs = run_comparison.plan_runs(module, variant, module.SEEDS)
        n_sweep = len(run_comparison.sweep_items(module))
        assert len(runs) == len(module.METHODS) * len(module.SEEDS) * n_sweep
        names = [n for n, _ in runs]
        assert len(set(names)) == len(names)
        for name, cfg in runs:
            assert cfg.algorithm in ALGORITHMS
            label = next(m for m in module.METHODS if name.startswith(f"{m}_"))
            assert cfg.algo == module.METHODS[label].get("algo", {})


def test_unknown_variant_refused():
    module = run_comparison.load_module(CONFIG_DIR / "byun_lee.py")
    with pytest.raises(ValueError, match="variant"):
        module.get_config("huge")


def test_run_name_and_overrides():
    base = ExperimentConfig(name="x", client_ranks=(2, 4, 8))
    cfg = run_comparison.make_run_config(base, "fedit", {"algorithm": "fedit", "client_ranks": ()}, seed=2,
                                         field="dirichlet_alpha", value=0.1)
    assert (cfg.seed, cfg.client_ranks, cfg.dirichlet_alpha, cfg.algorithm) == (2, (), 0.1, "fedit")
    assert run_comparison.run_name("fedit", 2, "dirichlet_alpha", 0.1) == "fedit_dirichlet_alpha0.1_s2"
    assert run_comparison.run_name("fedit", 0) == "fedit_s0"


def _first_method_config(path: Path) -> ExperimentConfig:
    if path.stem in STANDALONE:
        return load_config(path, variant="smoke")
    module = run_comparison.load_module(path)
    return run_comparison.plan_runs(module, "smoke", (0,))[0][1]


def _same_run_as(path: Path) -> str | None:
    """The config (earlier in ``CONFIGS``) whose first smoke run is this one's but for the run's
    name (e.g. a setting 2 that only changes the full variant), or ``None``."""
    def key(p):
        cfg = _first_method_config(p)
        return dataclasses.replace(cfg, name="")

    mine = key(path)
    return next((p.stem for p in CONFIGS[:CONFIGS.index(path)] if key(p) == mine), None)


def test_smoke_runs_shared_by_two_configs_differ_only_in_name():
    # hafl_llm_curve changes only the full variant of hafl_llm: its smoke run is hafl_llm's
    assert _same_run_as(CONFIG_DIR / "hafl_llm_curve.py") == "hafl_llm"
    assert _same_run_as(CONFIG_DIR / "byun_lee_frozen_head.py") is None   # freeze_head differs


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smoke_variant_runs(path, tmp_path):
    from fedlora_jax.driver.run import run_experiment

    twin = _same_run_as(path)
    if twin is not None:
        pytest.skip(f"its smoke run is {twin}'s (the configs differ only in the run's name), which runs")
    cfg = _first_method_config(path)
    summary = run_experiment(cfg, tmp_path / "run", quiet=True, cache_dir=tmp_path / "cache")
    assert summary["rounds_completed"] == cfg.rounds
    if cfg.task == "causal_lm":
        assert math.isfinite(summary["final_test_perplexity"]) and summary["final_test_perplexity"] >= 1.0
        assert 0.0 <= summary["final_test_token_accuracy"] <= 1.0
        assert len(summary.get("samples", [])) == cfg.generate_samples
    else:
        assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    rows = make_results.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(-1, cfg.rounds))


@pytest.mark.slow
def test_hypergrad_experiment_smoke_runs(tmp_path):
    """experiments/hypergrad_weights.py --smoke: every arm of both studies runs 2 rounds and
    writes its result with one compiled round per arm."""
    hg = import_file(ROOT / "experiments" / "hypergrad_weights.py", "hypergrad_weights_under_test")
    assert hg.main(["--smoke", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == sum(len(arms) for arms in hg.STUDIES.values())
    for f in files:
        res = json.loads(f.read_text())
        assert res["round_traces"] == 1 and len(res["history"]) == 2
        assert 0.0 <= res["final_test_accuracy"] <= 1.0


def test_select_runs_exact_labels_and_sweep_values():
    """--only takes exact labels (hafl_freeze does not select hafl_freeze_balanced) and
    --sweep-values keeps only those SWEEP values; unknown ones are refused."""
    skew = run_comparison.load_module(CONFIG_DIR / "hafl_rank_skew.py")
    runs = run_comparison.plan_runs(skew, "smoke", (3, 4))
    names = [n for n, _ in run_comparison.select_runs(skew, runs, (3, 4), only=["hafl_freeze"])]
    assert names == ["hafl_freeze_s3", "hafl_freeze_s4"]
    with pytest.raises(ValueError, match="no SWEEP"):
        run_comparison.select_runs(skew, runs, (3, 4), sweep_values=["0.1"])
    hafl = run_comparison.load_module(CONFIG_DIR / "hafl.py")
    runs = run_comparison.plan_runs(hafl, "smoke", (3,))
    names = [n for n, _ in run_comparison.select_runs(hafl, runs, (3,), only=["zero_padding"],
                                                      sweep_values=["0.1"])]
    assert names == ["zero_padding_dirichlet_alpha0.1_s3"]
    assert len(run_comparison.select_runs(hafl, runs, (3,))) == len(runs)
    with pytest.raises(ValueError, match="unknown values"):
        run_comparison.select_runs(hafl, runs, (3,), sweep_values=["0.3"])
    with pytest.raises(ValueError, match="unknown method labels"):
        run_comparison.select_runs(hafl, runs, (3,), only=["hafl"])
