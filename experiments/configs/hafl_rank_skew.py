"""Diagnostic for the HAFL comparison: is HAFL's seed-2 deficit (alpha 0.5) the label skew of its
rank-8 clients? The same setting as ``hafl.py`` at alpha 0.5, with the same ranks reassigned so
the highest go to the clients with the most balanced labels (``rank_order="label_entropy"``).

Why: in ``hafl.py`` the ranks follow the client index (clients 7-9 get rank 8). Under HAFL's
rank-1 adaptive aggregation a rank-1 component is averaged over the clients that updated it
only, so components 5-8 are trained by the three rank-8 clients alone, while zero padding
averages them with zeros over all ten (and so dilutes them). In seed 2 the three rank-8
clients hold 29 of the 1,032 Sci/Tech training articles (3%); in seeds 0 and 1 they hold at
least 25% and 35% of every class (the table "Share of each class's training examples held by
the highest-rank clients" on the results page). The hypothesis, stated before these runs: the
high components then encode "not Sci/Tech", the global model loses Sci/Tech accuracy under
HAFL, and the deficit to zero padding disappears when the rank-8 clients' labels are balanced.

Arms (paired by seed; the same data in every arm of a seed):
  hafl_freeze              as in hafl.py (ranks by client index); rerun to log per-class accuracy
  zero_padding             as in hafl.py (ranks by client index)
  hafl_freeze_balanced     HAFL-freeze, ranks by label entropy (rank 8 on the 3 most balanced)
  zero_padding_balanced    zero padding, ranks by label entropy

Runbook:
  command:  python experiments/run_comparison.py --config experiments/configs/hafl_rank_skew.py
            --seeds 2 0 1   (seed 2 first: the seed that failed; resumable; 4 arms x 3 seeds)
            The unbalanced arms rerun hafl.py's (seed 2 reproduced it exactly); they are run
            in every seed so that each claim here is paired within this comparison.
  hardware: CPU, 2 cores (no accelerator); about 3 min per run on quiet cores.
"""

import dataclasses
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_hafl_base", Path(__file__).with_name("hafl.py"))
_hafl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hafl)

SEEDS = (0, 1, 2)
BALANCED = {"rank_order": "label_entropy"}
METHODS = {
    "hafl_freeze": _hafl.METHODS["hafl_freeze"],
    "zero_padding": _hafl.METHODS["zero_padding"],
    "hafl_freeze_balanced": {**_hafl.METHODS["hafl_freeze"], **BALANCED},
    "zero_padding_balanced": {**_hafl.METHODS["zero_padding"], **BALANCED},
}

TARGET = {"fraction": 0.95, "reference": "zero_padding_balanced"}
CLAIMS = (
    {"claim": "with the high ranks on the most balanced clients, HAFL (freeze) ends above zero padding",
     "arm": "hafl_freeze_balanced", "ref": "zero_padding_balanced", "metric": "last3_acc", "direction": +1},
    {"claim": "with the high ranks on the most balanced clients, HAFL (freeze) converges faster (AUC)",
     "arm": "hafl_freeze_balanced", "ref": "zero_padding_balanced", "metric": "auc", "direction": +1},
    {"claim": "HAFL (freeze) gains from balanced high-rank clients",
     "arm": "hafl_freeze_balanced", "ref": "hafl_freeze", "metric": "last3_acc", "direction": +1},
)
DIFFERENCES = _hafl.DIFFERENCES


#: make_results: the reading of the finished runs (2026-12-01: seed 2 only, so a diagnostic, not a verdict).
FINDINGS = (
    "Seed 2 (alpha 0.5), the seed where HAFL lost. Both predictions made before the runs came out. (1) The "
    "rerun of hafl.py's arms reproduces them exactly (final 0.716 and 0.821), and HAFL-freeze's loss is one "
    "class: Sci/Tech accuracy 0.273 against zero padding's 0.676, with the other three classes within 0.05 "
    "(Business 0.732 / 0.785, Sports 0.920 / 0.923, World 0.914 / 0.881). Sci/Tech is the class its rank-8 "
    "clients 7-9 hold 3% of. (2) With the same ranks reassigned by label entropy (rank 8 on clients 0, 1 and 5, "
    "who hold at least 21% of every class), HAFL-freeze ends at 0.804 (last-3 0.816 against 0.734) and its "
    "Sci/Tech accuracy rises to 0.561: the gap to zero padding's 0.822 last-3 falls from -0.088 to -0.006. "
    "So on this setting HAFL's rank-1 adaptive aggregation is only as good as the label coverage of the clients "
    "that own the high components, while zero padding's dilution protects it from them. Zero padding itself "
    "barely moves with the reassignment (0.825 final, last-3 0.824, Sci/Tech 0.684), and with balanced ranks "
    "HAFL-freeze is level with it (-0.007 last-3), not above it. Seeds 0 and 1 of the balanced arms are what "
    "the verdicts above still need.")


def get_config(variant: str = "full"):
    cfg = _hafl.get_config(variant)
    return dataclasses.replace(cfg, name="hafl_rank_skew", dirichlet_alpha=0.5)
