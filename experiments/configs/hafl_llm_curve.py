"""HAFL (arXiv 2411.06581) on the real LLM, setting 2: twice the training of ``hafl_llm.py`` with
evaluation during training, so that the paper's convergence-speed claim is tested on an LLM.

Why this setting: on SmolLM2 the adapters carry the whole gain (zero-shot 0.270 -> about 0.55
after ``hafl_llm.py``'s 6 rounds), so there is room without a pilot (the LM has no head to
train); but setting 1 evaluated only before and after training, and its 3 seeds gave intervals
of about +-0.24 on the final accuracy. Here: 12 rounds, evaluated every 3 rounds (rounds 2, 5,
8, 11) on the first 600 test articles, so the area under the accuracy curve (a speed claim) and
the last evaluations' mean are both measured. The ranks follow the client index
(2/2/2/2/4/4/4/8/8/8), as in setting 1: with a Dirichlet partition drawn per seed, which clients
hold which labels is independent of their rank (not tied to the skew).

Claims (written 2026-12-07, before any run of this comparison): HAFL (freeze) ends above zero
padding (last-3 evaluations), converges faster (area under the accuracy curve), and loses less
than zero padding when the model is cut to a rank-2 client.

Arms (paired by seed): hafl_freeze and zero_padding as in hafl_llm.py.

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/hafl_llm_curve.py
            (2 arms x 3 seeds = 6 runs, resumable, seed-major; results in
            experiments/results/hafl_llm_curve/; then python experiments/make_results.py)
  hardware: CPU, 2 cores (no accelerator); SmolLM2-135M in float32.
  runtime:  measured 2026-12-07 (jax 0.10.2, 2 quiet cores): hafl_freeze seed 0, 905 s (15.1 min; zero_padding 896 s),
            12 rounds and 5 evaluations of 600 articles plus the rank-2 evaluation; the 6 runs
            about 1.5 h. Seed 0 of both arms ran first (2026-12-07); seeds 1-2 are next.
"""

import dataclasses
import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig

sys.path.insert(0, str(Path(__file__).parent))
from _base import load_base  # noqa: E402

_base = load_base("hafl_llm")

SEEDS = (0, 1, 2)
METHODS = {k: dict(v) for k, v in _base.METHODS.items()}
TARGET = None
CLAIMS = (
    {"claim": "HAFL (freeze) ends above zero padding on the LLM under non-IID data",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "last3_acc", "direction": +1},
    {"claim": "HAFL (freeze) converges faster than zero padding on the LLM (area under the accuracy curve)",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "auc", "direction": +1},
    {"claim": "freezing loses less than zero padding when the model is cut to a rank-2 client",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "distribution_drop:2", "direction": -1},
)
#: Declared 2026-12-07, before the runs.
ACCURACY_MARGIN = {"delta": 0.02, "reason": "one binomial standard error of one evaluation on the 600 test "
                   "articles at accuracy 0.5 (0.020): a smaller difference is below what one evaluation resolves"}
MARGINS = {"last3_acc": ACCURACY_MARGIN, "auc": ACCURACY_MARGIN, "distribution_drop:2": ACCURACY_MARGIN}
DIFFERENCES = ("SmolLM2-135M instead of LLaMA-class models; AG News (4 topics) instead of 20 Newsgroups / "
               "Banking77; 12 rounds of 3 steps on 2 CPU cores, evaluated every 3 rounds on 600 articles.")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = _base.get_config(variant)
    cfg = dataclasses.replace(cfg, name=cfg.name.replace("hafl_llm", "hafl_llm_curve", 1))
    if variant == "smoke":
        return cfg
    return dataclasses.replace(cfg, rounds=12, eval_every=3, test_limit=600)
