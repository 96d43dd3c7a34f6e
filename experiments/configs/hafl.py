"""HAFL (arXiv 2411.06581): importance-based rank-1 freezing vs truncation vs HetLoRA's zero
padding, under heterogeneous ranks and non-IID (Dirichlet label-skew) data, AG News.

Claims tested: (1) HAFL with freezing and rank-1 adaptive aggregation beats zero padding under
non-IID data and converges faster; (2) freezing beats truncation; (3) freezing loses no accuracy
when the global model is handed to a low-rank client ("degradation at distribution"), while
truncation and zero padding do (``eval_distributed_ranks``: the accuracy of the model a rank-2
client receives, from the algorithm's own plan and distribute).

Arms (paired by seed: every arm of a seed holds the same data; all 10 clients take part in
every round):
  hafl_freeze    every client runs the whole global adapter and updates its r_k most important
                 rank-1 components (smoothed sensitivity), rank-1 adaptive aggregation
  hafl_truncate  each client receives only its top-r_k components by global importance
  zero_padding   HetLoRA: prefix ranks, zero padding with sparsity (norm) weighting
  head_only      no adapter: only the classifier head is federated (the adapters' share)

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/hafl.py
            (4 arms x 3 seeds x 2 alphas = 24 runs, resumable; results in
            experiments/results/hafl/; then python experiments/make_results.py)
  seeds 3, 4: added 2026-12-07 (issue 32) after the 3-seed verdicts, for the arms of the claims that
            3-5 paired seeds decide at the observed spread, and only those (no claim or margin
            changed): alpha 0.1 hafl_freeze and zero_padding at seed 3 (distribution drop, 4 seeds
            needed); alpha 0.5 hafl_freeze and hafl_truncate at seeds 3 and 4 (freezing vs
            truncation, 5). The other claims need 30-700 seeds and were left at 3. Commands:
            run_comparison.py --config experiments/configs/hafl.py --seeds 3 \
              --sweep-values 0.1 --only hafl_freeze zero_padding
            run_comparison.py --config experiments/configs/hafl.py --seeds 3 4 \
              --sweep-values 0.5 --only hafl_freeze hafl_truncate
  hardware: CPU, 2 cores (no accelerator)
  runtime:  measured (2026-11/12, jax 0.10.2): 24 runs, 95.8 min of wall time in all, over the
            budget of about an hour; part of it with two comparisons sharing the 2 cores.
            About 70 min on quiet cores (the sum over arms of each arm's fastest run). Each run's
            wall time is in its summary.json (``wall_s``), the total on the results page.

Setup: real MiniLM-L6 encoder (all-MiniLM-L6-v2), 4,000 AG News training articles (4 classes,
max 40 tokens) over 10 clients with Dirichlet(alpha) label skew, alpha in {0.5, 0.1}; ranks
2/2/2/2/4/4/4/8/8/8 (r_max 8) on query/value; all 10 clients in every round (full
participation, as in HAFL's small-federation setting); 12 rounds of 5 local AdamW steps of 16
articles (lr 2e-3); evaluated every 2 rounds on the first 1,000 test articles.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, select_variant

sys.path.insert(0, str(Path(__file__).parent))
from _base import ACCURACY_MARGIN_1000  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
SWEEP = {"dirichlet_alpha": (0.5, 0.1)}

METHODS = {
    "hafl_freeze": {"algorithm": "hafl", "algo": {"mode": "freeze"}},
    "hafl_truncate": {"algorithm": "hafl", "algo": {"mode": "truncate"}},
    "zero_padding": {"algorithm": "hetlora"},
    "head_only": {"algorithm": "head_only"},
}

#: make_results: the target accuracy is this fraction of the reference arm's mean last-3 accuracy.
TARGET = {"fraction": 0.95, "reference": "zero_padding"}
#: make_results: paired comparisons per seed (arm - ref), in the direction the paper claims.
CLAIMS = (
    {"claim": "HAFL (freeze) ends above zero padding under non-IID data",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "last3_acc", "direction": +1},
    {"claim": "HAFL (freeze) converges faster than zero padding (area under the accuracy curve)",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "auc", "direction": +1},
    {"claim": "HAFL (freeze) reaches the target in fewer rounds than zero padding",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "rounds_to_target", "direction": -1},
    {"claim": "freezing beats truncation",
     "arm": "hafl_freeze", "ref": "hafl_truncate", "metric": "last3_acc", "direction": +1},
    {"claim": "freezing loses less than truncation when the model is cut to a rank-2 client",
     "arm": "hafl_freeze", "ref": "hafl_truncate", "metric": "distribution_drop:2", "direction": -1},
    {"claim": "freezing loses less than zero padding when the model is cut to a rank-2 client",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "distribution_drop:2", "direction": -1},
    {"claim": "the adapters add to the head alone",
     "arm": "hafl_freeze", "ref": "head_only", "metric": "last3_acc", "direction": +1},
)
#: make_results: the equivalence margin of each claimed metric, in its units, with the reason printed on
#: the page. Declared 2026-12-06 (issue 32), after the runs now on the page; fixed before any further run.
ACCURACY_MARGIN = ACCURACY_MARGIN_1000
MARGINS = {
    "last3_acc": ACCURACY_MARGIN,
    "auc": ACCURACY_MARGIN,
    "rounds_to_target": {"delta": 2.0, "reason": "one evaluation interval (eval_every = 2), the metric's "
                                                  "resolution: 17% of the 12 rounds"},
    "distribution_drop:2": ACCURACY_MARGIN,
}
#: make_results: where this setting differs from the paper's, printed beside the verdicts.
DIFFERENCES = ("HAFL fine-tunes LLMs (LLaMA-class) on 20 Newsgroups / Banking77; here the MiniLM-L6 encoder "
               "on AG News with 10 clients, 12 rounds and ranks 2/4/8, on 2 CPU cores. The paper's body was "
               "not read: the selection timing and the first-round start are ASSUMPTIONS "
               "(fedlora_jax/algorithms/hafl.py).")

#: make_results: the reading of the finished runs (2026-12-01: all 24 runs).
FINDINGS = (
    "No claim holds; rounds-to-target does not hold at either alpha (HAFL-freeze never reaches the target in "
    "seed 2). Both HAFL modes keep the slots above rank 2 alive (summed norm of slots 4-7 at the end: 10.8 / "
    "11.3 at alpha 0.5 and 13.7 / 12.9 at alpha 0.1, against 0.014 and 0.036 under zero padding: the dilution"
    " Byun & Lee describe), but accuracy does not follow. Where HAFL loses, it loses in the seeds whose "
    "rank-8 clients (clients 7-9) hold almost none of some class, from the table of class shares above: the "
    "per-seed last-3 difference freeze - zero padding is +0.002 / -0.011 / -0.036 where the rank-8 clients' "
    "least-held class share is 0.35 / 0.25 / 0.14 (alpha 0.5 s1, alpha 0.5 s0, alpha 0.1 s1), and -0.088 / "
    "-0.060 / -0.242 where it is 0.03 / 0.00 / 0.00 (alpha 0.5 s2, alpha 0.1 s0, alpha 0.1 s2). The mechanism"
    " this points to: under rank-1 adaptive aggregation a component above rank 4 is averaged over the three "
    "rank-8 clients only, so it carries their label skew at full weight, while zero padding shrinks it by the"
    " seven zeros. Truncation shows the same thing from the other side: its rank-2 cut (the components "
    "everyone trains) beats its own whole global model (distribution drop -0.044 at alpha 0.5, -0.183 at "
    "alpha 0.1). The hafl_rank_skew comparison tested this at alpha 0.5 (3 seeds) by giving rank 8 to the "
    "most balanced clients instead: the seed-2 deficit vanishes (-0.088 -> -0.007) and HAFL-freeze ends level"
    " with zero padding (-0.001 [-0.0216, +0.0200]), not above it. HAFL's freezing removes the degradation at"
    " distribution by construction (drop 0.000: every client receives the whole model), but zero padding's "
    "drop is also about 0 (-0.001, -0.004) here, so the claim against it cannot show. The head-only control "
    "(last-3 0.833 at alpha 0.5, 0.805 at alpha 0.1) against zero padding (0.839, 0.834): the adapters add at"
    " most +0.03, the room in which the aggregation rules can differ. Seed 3 at alpha 0.1 (2026-12-07, "
    "freeze and zero padding only, for the distribution-drop claim) shows the mechanism from the other side:"
    " its rank-8 clients hold 89% of the Sci/Tech articles and 2% of Sports. HAFL-freeze again loses the "
    "class they lack (Sports 0.814 against zero padding's 0.927), but zero padding, which shrinks the "
    "components only they train, loses the class only they hold (Sci/Tech 0.292 against 0.767), so here "
    "HAFL-freeze ends +0.115 above it (the first seed at alpha 0.1 where it wins) and the 4-seed "
    "distribution-drop difference is -0.004 [-0.0216, +0.0141] (90%; underpowered, 9 seeds). Which rule "
    "wins follows from which classes the high-rank clients hold: the dilution Byun & Lee describe costs "
    "accuracy exactly when the high-rank clients' data is unique. At alpha 0.5, seeds 3 and 4 of freezing "
    "and truncation (for 'freezing beats truncation', 5 seeds looked enough): -0.009 and +0.008, so -0.005 "
    "[-0.0154, +0.0045] over 5 seeds (90%): no sign that freezing beats truncation, but the interval's lower "
    "end is past the -0.01 margin (underpowered; 17 seeds at the observed mean).")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="hafl", model="all-MiniLM-L6-v2", dataset="agnews", test_split="test", max_length=40,
        train_limit=4000, test_limit=1000, num_clients=10, clients_per_round=10, rounds=12,
        local_steps=5, batch_size=16, partition="dirichlet", dirichlet_alpha=0.5, r_max=8,
        lora_alpha=16.0, target_modules=("query", "value"), client_ranks=(2, 2, 2, 2, 4, 4, 4, 8, 8, 8),
        algorithm="hafl", algo={"mode": "freeze"}, lr=2e-3, chunk_size=10, eval_every=2,
        eval_batch_size=250, checkpoint_every=1000, eval_distributed_ranks=(2,),
    )
    return select_variant(cfg, variant, client_ranks=(2, 4, 8), clients_per_round=4)
