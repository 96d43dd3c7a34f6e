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
            (3 arms x 5 seeds = 15 runs, resumable, seed-major: seeds 0-2 ran first; results in
            experiments/results/legend_frozen_head/; then python experiments/make_results.py)
  hardware: CPU, 2 cores (no accelerator); device times are SIMULATED by the cost model.
  runtime:  measured 2026-12-07 (jax 0.10.2, 2 quiet cores but for legend_s0): 9 runs, 36.6 min of
            wall time in all, 3.4-4.2 min per run (each run's ``wall_s`` in its summary.json).
  seeds 3, 4: every arm, added 2026-12-07 after the 3-seed verdicts left three of five claims
            underpowered (issue 32: 5 paired seeds where 3 cannot decide; no claim, target rule
            or margin changed; the target, 0.95 x uniform LoRA's mean last-3 accuracy, moved from
            0.807 to 0.801 with the two seeds). 6 runs, 3.5-4.0 min each on quiet cores; all 15
            runs 59.1 min.
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


#: make_results: the reading of the finished runs (2026-12-07: 9 runs, 3 seeds; then seeds 3-4).
FINDINGS = (
    "With the head frozen the target (0.807, 0.95 x uniform LoRA's last-3) is one only the adapters reach, "
    "and from a random head's 0.28 every arm reaches it in every seed. Where the adapters sit matters, both "
    "claims hold: on the same payload (identical uplink per round, 22.04 MB over the run) LEGEND's plan, "
    "with the ranks near the output, ends above the same ranks on the bottom layers in every seed (+0.003, "
    "+0.006, +0.006; +0.005 [+0.0001, +0.0097], smaller than the 0.01 margin) and reaches the target 1.72x "
    "sooner in simulated time (-28.5 s [-37.5, -19.4]: a shallow adapter near the output cuts the backward "
    "pass the slow devices run). Against uniform LoRA (every device rank 8 on all 6 layers), LEGEND reaches "
    "the target with 1.73x less uplink (14.6 against 25.2 MB; the paper: ~42% less) and 1.41x less simulated "
    "time (the paper: 1.5-2.8x), less in every seed, but with 3 seeds neither 95% interval excludes 0 "
    "(uplink -10.6 [-23.2, +2.0], 14 seeds for the one-round margin; time -16.2 [-49.1, +16.7], 19 seeds): "
    "underpowered, in the paper's direction. LEGEND ends 0.029 below uniform LoRA (-0.019, -0.055, -0.011; "
    "underpowered, 17 seeds), as in setting 1 where the same gap (-0.018) was decided: the phone and "
    "Raspberry Pi clients (half of the 40) get one rank on the top layer only, so LEGEND trains far less "
    "adapter than uniform LoRA, which gives every device the whole adapter whatever its speed. In setting 1 "
    "the head alone reached the target before LEGEND; here it cannot, and LEGEND's to-target savings grow "
    "from 4.5 to 10.6 MB and 5.6 to 16.2 simulated s. The plot shows LEGEND and the bottom-layer control "
    "still rising at round 20 (about 0.79 -> 0.84 over the last four evaluations) while uniform LoRA has "
    "been at 0.84-0.86 since round 14, so part of the accuracy gap may be the short run. With seeds 3 and 4 "
    "(all arms, 2026-12-07; the target moved to 0.801) the paper's to-target claims against uniform LoRA "
    "hold: LEGEND reaches the target with 1.70x less uplink (15.5 against 26.4 MB; -10.9 MB [-15.6, -6.2]; "
    "the paper: ~42% less) and in 1.46x less simulated time (-19.2 s [-32.0, -6.4]; the paper: 1.5-2.8x), "
    "less in every seed. It costs accuracy, against the paper: LEGEND ends 0.053 below uniform LoRA (-0.092 "
    "and -0.087 in seeds 3 and 4; [-0.099, -0.007], reversed); in those seeds its global model swings "
    "between classes, one class falling to 0.10-0.22 at one of the last three evaluations (seed 3: Business "
    "at round 15; seed 4: World at the end), where uniform LoRA's lowest class is 0.51: the cost of giving "
    "half the clients one rank on one layer. Near-output against bottom layers: the target is still reached "
    "1.78x sooner (-32.1 s, holds, every seed), but the end-point advantage that held at 3 seeds (+0.005) "
    "does not survive seeds 3 and 4 (+0.055, -0.014; +0.011 [-0.021, +0.043], underpowered, 20 seeds "
    "needed): the second look can undo a verdict as well as make one."
)


def get_config(variant: str = "full") -> ExperimentConfig:
    return frozen_config(_base, variant, "legend_frozen_head")
