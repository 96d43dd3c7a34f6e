"""FedARA (arXiv 2501.14406), setting 2: the comparison of ``fedara.py`` with the classifier head
frozen in every arm, so the communication and time to the target are the adapters'.

Why this setting: in ``fedara.py`` (setting 1) the head-only control ends within 0.010 of
FedARA, and the target (0.95 x fixed rank 12's last-3 accuracy) is reached during FedARA's
warm-up, before any rank is cut: "less communication to the target" could not show the
allocation's effect. With the head frozen at its seed's initialization (``freeze_head=True``, see
``_frozen_head.py``) the model starts at a random head's accuracy and the target needs the
adapters.

Claims (written 2026-12-07, before any run of this comparison): setting 1's without the head-only
one: FedARA sends less and takes less simulated time than fixed rank r0 to the target (the
paper: 2.40x less communication, up to 48.9% less time), uses less simulated energy and sends
less over the run, keeps fixed rank r0's accuracy, beats fixed rank at the same final budget and
AdaLoRA run federatedly.

Arms (paired by seed): fedara, fixed_r12, fixed_r4, adalora as in fedara.py, each with the head
frozen.

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/fedara_frozen_head.py
            (4 arms x 5 seeds = 20 runs, resumable, seed-major: seeds 0-2 first; results in
            experiments/results/fedara_frozen_head/; then python experiments/make_results.py)
  hardware: CPU, 2 cores (no accelerator); device times and energy are SIMULATED.
  runtime:  not run yet; setting 1's arms took about 7-9 min each on quiet cores.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig

sys.path.insert(0, str(Path(__file__).parent))
from _base import load_base  # noqa: E402
from _frozen_head import frozen_config, frozen_head  # noqa: E402

_base = load_base("fedara")
#: Claims, target and margins declared 2026-12-07, before the runs: setting 1's (fedara.py gives
#: the margins' reasons).
globals().update(frozen_head(_base))


def get_config(variant: str = "full") -> ExperimentConfig:
    return frozen_config(_base, variant, "fedara_frozen_head")
