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
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/hafl_rank_skew.py
            --seeds 2 0 1   (seed 2 first: the seed that failed; resumable; 4 arms x 3 seeds)
            The unbalanced arms rerun hafl.py's (seed 2 reproduced it exactly); they are run
            in every seed so that each claim here is paired within this comparison.
  hardware: CPU, 2 cores (no accelerator); about 3 min per run on quiet cores.
  seeds 3, 4: added 2026-12-07 (issue 32; `--seeds 3 4`) after the 3-seed verdicts: at the
            observed spread 4-5 paired seeds decide the two balanced-arm claims; no margin or
            claim changed. All four arms ran them (2.5-3 min per run on quiet cores); the
            unbalanced two first, by a slip (they serve only the third claim, 58 seeds needed).
"""

import dataclasses
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_hafl_base", Path(__file__).with_name("hafl.py"))
_hafl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hafl)

#: 0-2 first, 3-4 added 2026-12-07 (see the runbook).
SEEDS = (0, 1, 2, 3, 4)
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
MARGINS = _hafl.MARGINS
DIFFERENCES = _hafl.DIFFERENCES


#: make_results: the reading of the finished runs (2026-12-01: the 12 runs of seeds 0-2; 2026-12-07:
#: seeds 3 and 4, the last sentences).
FINDINGS = (
    "Seeds 0-2 (12 runs, alpha 0.5); the hypothesis was written in the docstring before the runs, and seed "
    "2 was run first. (1) The unbalanced arms reproduce hafl.py's accuracy curves exactly in every seed (seed"
    " 2: final 0.716 and 0.821). (2) HAFL-freeze's seed-2 loss is one class: Sci/Tech accuracy 0.273 against "
    "zero padding's 0.676, the other three within 0.05 (Business 0.732 / 0.785, Sports 0.920 / 0.923, World "
    "0.914 / 0.881); Sci/Tech is the class its rank-8 clients 7-9 hold 3% of. (3) With the same ranks "
    "reassigned by label entropy, the per-seed last-3 gap HAFL-freeze - zero padding goes from -0.011 / "
    "+0.002 / -0.088 (seeds 0 / 1 / 2) to +0.009 / -0.004 / -0.007. The seed-2 deficit is gone (HAFL-freeze's"
    " last-3 0.734 -> 0.816, Sci/Tech 0.273 -> 0.561) and the spread of HAFL-freeze's final accuracy over "
    "seeds falls from 0.079 to 0.036 (sd). In seeds 0 and 1, whose rank-8 clients already held at least 25% "
    "of every class, the reassignment changes HAFL-freeze by +0.020 and -0.005. So the diagnosis holds: here "
    "HAFL's rank-1 adaptive aggregation is only as good as the label coverage of the clients that own the "
    "high components, while zero padding's dilution (last slot-4-7 norm 0.014 against HAFL's 10.8) shields "
    "the global model from them; zero padding itself barely moves with the reassignment (last-3 0.839 -> "
    "0.840). With balanced ranks HAFL-freeze is level with zero padding (-0.001 [-0.0216, +0.0200]), not "
    "above it: the paper's accuracy gain does not appear in this setting even without the skew. 'HAFL gains "
    "from balanced high-rank clients' is underpowered over the 3 seeds (+0.032 [-0.0801, +0.1450]; 58 "
    "paired seeds at the observed spread) because "
    "the gain is in the one seed that had the skew. Seeds 3 and 4 (added 2026-12-07 because 4-5 seeds "
    "looked enough) widened the spread instead: the balanced gap is +0.003 and -0.026, so over 5 seeds "
    "HAFL-freeze vs zero padding is -0.005 [-0.0215, +0.0112] (underpowered, 7 seeds at the observed spread) "
    "and the AUC gap -0.009 (22). Seed 4's loss is the same mechanism again: ranking by label entropy put "
    "rank 8 on clients 0, 3 and 9, which hold 3% of the Business articles, and HAFL-freeze's Business "
    "accuracy is 0.546 against zero padding's 0.790 (the other classes within 0.05). Entropy ranking does "
    "not guarantee that the high-rank clients cover every class; per-class coverage, not balance, is what "
    "HAFL's rank-1 aggregation needs here.")


def get_config(variant: str = "full"):
    cfg = _hafl.get_config(variant)
    return dataclasses.replace(cfg, name="hafl_rank_skew", dirichlet_alpha=0.5)
