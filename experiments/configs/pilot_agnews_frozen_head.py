"""Pilot (issue 32): Byun & Lee's AG News setting with the classifier head frozen.

Question: in the Byun & Lee comparison (MiniLM-L6, AG News, 40 clients in two data-quality
groups, ranks 16/4, 20 rounds) the trained head alone ends within 0.007 of every LoRA arm, so
no aggregation rule can show a difference there. With the head frozen at its initialization
(one per seed, the same in every arm: ``freeze_head=True``, the control of the FFA-LoRA line of
work) the adapters carry all of the learning. Do they learn enough to compare aggregation rules,
i.e. does the plainest LoRA arm end at least 0.05 above the frozen head alone (its own accuracy
before training; 3 binomial standard errors of 1,000 test articles at 0.5 is 0.047)?

Arms (paired by seed):
  zero_padding_frozen  FedIT with Byun & Lee's heterogeneous ranks (16 / 4), head frozen
(For context, setting 1's controls in the same seeds, from experiments/results/byun_lee/: the
trained head alone ends at last-3 0.840 on average, zero padding with a trained head at 0.848.
A ``head_only`` arm here would rerun them exactly, so it is not repeated.)

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/pilot_agnews_frozen_head.py
            (1 arm x 2 seeds = 2 runs, resumable; results in experiments/results/pilot_agnews_frozen_head/)
  hardware: CPU, 2 cores (no accelerator)
  runtime:  each run's ``wall_s`` in its summary.json, the total on the results page.
  decision: keep the frozen-head setting for the rebuilt Byun & Lee comparison only if
            zero_padding_frozen's last-3 accuracy minus its own before-training accuracy is at
            least 0.05 in both seeds.
"""

import importlib.util
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig

_spec = importlib.util.spec_from_file_location("byun_lee_config", Path(__file__).with_name("byun_lee.py"))
byun_lee = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(byun_lee)

SEEDS = (0, 1)
METHODS = {
    "zero_padding_frozen": {"algorithm": "fedit", "freeze_head": True},
}
#: make_results: the pilot's rule: ``arm`` minus ``control`` (an arm, or "initial": the arm's own
#: accuracy before training) on ``metric``, at least ``min_gain`` in every seed.
PILOT = {"arm": "zero_padding_frozen", "control": "initial", "metric": "last3_acc", "min_gain": 0.05}
#: make_results: the reading of the finished runs (2026-12-07, both seeds).
FINDINGS = (
    "Kept, by a wide margin: with the head frozen at its initialization the model starts at a random head's "
    "accuracy (0.327 and 0.285) and zero padding's adapters alone take it to last-3 0.726 and 0.832 (+0.40 "
    "and +0.55, eight to eleven times the bar). Seed 1 ends where setting 1's trained-head arms end (0.84); "
    "seed 0 is still oscillating (0.65-0.79 over its last four evaluations), so the frozen-head setting "
    "learns more slowly and more noisily than a trained head, and every point of its accuracy is the "
    "adapters'. The rebuilt comparisons: byun_lee_frozen_head, legend_frozen_head, fedara_frozen_head.")


def get_config(variant: str = "full") -> ExperimentConfig:
    import dataclasses

    cfg = byun_lee.get_config(variant)
    return dataclasses.replace(cfg, name=cfg.name.replace("byun_lee", "pilot_agnews_frozen_head"))
