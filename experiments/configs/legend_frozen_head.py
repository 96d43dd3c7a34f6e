"""LEGEND (arXiv 2412.20004), setting 2: the comparison of ``legend.py`` with the classifier
head frozen in every arm, so the target accuracy is one only the adapters can reach.

Why this setting: in ``legend.py`` (setting 1) the head-only control reaches the target (0.95 x
uniform LoRA's last-3 accuracy) in 19.2 simulated s, sooner than LEGEND (21.3 s): time and
traffic to that target mostly measured how fast the head trains. With the head frozen at its
seed's initialization (``freeze_head=True``, see ``_frozen_head.py``) the accuracy before
training is that of a random head (about 0.3 on AG News), and every gain is the adapters'.

Claims (written 2026-12-07, before any run of this comparison): setting 1's without the head-only
one: LEGEND reaches the target in less simulated time and with less uplink than uniform LoRA
(the paper: 1.5-2.8x, ~42% less); adapters near the output beat the same payload on the bottom
layers and reach the target sooner; LEGEND keeps uniform LoRA's accuracy.

Arms (paired by seed): legend, bottom_control, uniform_fedit as in legend.py, each with the head
frozen.

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/legend_frozen_head.py
            (3 arms x 3 seeds = 9 runs, resumable, seed-major; results in
            experiments/results/legend_frozen_head/; then python experiments/make_results.py)
  hardware: CPU, 2 cores (no accelerator); device times are SIMULATED by the cost model.
  runtime:  not run yet; setting 1's arms took about 7-10 min each on quiet cores.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig

sys.path.insert(0, str(Path(__file__).parent))
from _base import load_base  # noqa: E402
from _frozen_head import frozen_config, frozen_head  # noqa: E402

_base = load_base("legend")
#: Claims, target and margins declared 2026-12-07, before the runs: setting 1's (legend.py gives
#: the margins' reasons; the head's bytes no longer travel, 0.3% of a round's uplink).
globals().update(frozen_head(_base))


def get_config(variant: str = "full") -> ExperimentConfig:
    return frozen_config(_base, variant, "legend_frozen_head")
