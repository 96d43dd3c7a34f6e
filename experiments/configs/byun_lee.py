"""Byun & Lee (arXiv 2406.17477): replication padding vs zero padding for aggregating LoRA
adapters of different ranks, in the paper's setting: the high rank sits on the few clients with
the best (balanced) data, the many others hold label-skewed data and a low rank; AG News.

Claim tested: zero padding dilutes what the high-rank clients learn in the slots only they own
(each such slot is averaged with the zeros of every low-rank client), replication padding does
not, so replication padding reaches a given accuracy in fewer rounds and ends higher.

Arms (paired by seed: every arm of a seed samples the same clients and holds the same data):
  replication        REP-MEAN: each slot averaged over the clients that own it
  naive_zero_padding FedIT with the same heterogeneous ranks: data weights over every client,
                     missing slots count as zeros (the dilution the paper describes)
  hetlora            HetLoRA's zero padding with sparsity (norm) weighting
  homogeneous_r4     every client at the low rank 4 (what the high-rank clients add at all)
  head_only          no adapter: only the classifier head is federated (the adapters' share)

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/byun_lee.py
            (5 arms x 5 seeds = 25 runs, resumable; results in experiments/results/byun_lee/;
            then python experiments/make_results.py). Seeds 3 and 4 were added on 2026-12-07
            (issue 32) after the 3-seed verdicts: at the observed spread 3-5 paired seeds decide
            the accuracy and speed claims (the rule the page prints beside "underpowered"); no
            margin or claim was changed.
  hardware: CPU, 2 cores (no accelerator)
  runtime:  measured (2026-11/12, jax 0.10.2): 15 runs, 113.5 min of wall time in all, over the
            budget of about an hour; part of it with two comparisons sharing the 2 cores.
            About 88 min on quiet cores (the sum over arms of each arm's fastest run). Each run's
            wall time is in its summary.json (``wall_s``), the total on the results page.

Setup: real MiniLM-L6 encoder (all-MiniLM-L6-v2), 10,000 AG News training articles (4 classes,
max 40 tokens) over 40 clients in two data-quality groups (``client_groups``):
4 "high-quality" clients with near-balanced Dirichlet(10) data at rank 16 and 36 clients with
Dirichlet(0.3) label skew at rank 4 (r_max 16, LoRA on query/value; the paper gives its best 10%
of clients rank 20 and balanced data, the rest rank 5). 8 clients per round (20%; P(at least one
high-quality client in a round) = 0.62), 20 rounds of 8 local AdamW steps of 16 articles
(lr 2e-3), evaluated every 2 rounds on the first 1,000 test articles. ``diagnose_first_round``
logs the paper's first-aggregation diagnostic (a high-rank client's accuracy before and after
aggregation); every evaluated row logs ``global_slot_norm`` (dilution of slots 4-15).
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, select_variant

sys.path.insert(0, str(Path(__file__).parent))
from _base import ACCURACY_MARGIN_1000  # noqa: E402

#: 0-2 first (2026-11/12), 3-4 added 2026-12-07 (see the runbook).
SEEDS = (0, 1, 2, 3, 4)
GROUPS = ((4, 10.0, 16), (36, 0.3, 4))

METHODS = {
    "replication": {"algorithm": "replication"},
    "naive_zero_padding": {"algorithm": "fedit"},
    "hetlora": {"algorithm": "hetlora"},
    "homogeneous_r4": {"algorithm": "fedit",
                       "client_groups": lambda base: tuple((n, alpha, 4) for n, alpha, _ in base.client_groups)},
    "head_only": {"algorithm": "head_only"},
}

#: make_results: the target accuracy is this fraction of the reference arm's mean final accuracy.
TARGET = {"fraction": 0.95, "reference": "naive_zero_padding"}
#: make_results: each claim is a paired comparison per seed (arm - ref) of one metric, in the
#: direction the paper claims (+1: the arm is higher, -1: the arm is lower).
CLAIMS = (
    {"claim": "replication padding reaches the target in fewer rounds than zero padding",
     "arm": "replication", "ref": "naive_zero_padding", "metric": "rounds_to_target", "direction": -1},
    {"claim": "replication padding learns faster than zero padding (area under the accuracy curve)",
     "arm": "replication", "ref": "naive_zero_padding", "metric": "auc", "direction": +1},
    {"claim": "replication padding ends above zero padding",
     "arm": "replication", "ref": "naive_zero_padding", "metric": "last3_acc", "direction": +1},
    {"claim": "replication padding ends above HetLoRA's norm-weighted zero padding",
     "arm": "replication", "ref": "hetlora", "metric": "last3_acc", "direction": +1},
    {"claim": "zero padding dilutes the slots only the high-rank clients own (slot norm, slots 4-15)",
     "arm": "naive_zero_padding", "ref": "replication", "metric": "slot_norm:4:16", "direction": -1},
    {"claim": "zero padding costs the high-rank client more accuracy at the first aggregation (the paper's "
              "diagnostic: its own model's accuracy minus that of the model it receives)",
     "arm": "naive_zero_padding", "ref": "replication", "metric": "diagnostic_drop", "direction": +1},
    {"claim": "the high-rank clients' extra slots help (replication vs everyone at rank 4)",
     "arm": "replication", "ref": "homogeneous_r4", "metric": "last3_acc", "direction": +1},
    {"claim": "the adapters add to the head alone",
     "arm": "replication", "ref": "head_only", "metric": "last3_acc", "direction": +1},
)
#: make_results: the equivalence margin of each claimed metric, in its units, with the reason printed on
#: the page. Declared 2026-12-06 (issue 32), after the runs now on the page; fixed before any further run.
ACCURACY_MARGIN = ACCURACY_MARGIN_1000
MARGINS = {
    "rounds_to_target": {"delta": 2.0, "reason": "one evaluation interval (eval_every = 2), the metric's "
                                                  "resolution: 10% of the 20 rounds"},
    "auc": ACCURACY_MARGIN,
    "last3_acc": ACCURACY_MARGIN,
    "slot_norm:4:16": {"delta": 1.0, "reason": "summed norm of slots 4-15: about a ninth of what they hold at the "
                       "first evaluation under replication padding (8.7), 2.5% of their final norm there (40.6)"},
    "diagnostic_drop": ACCURACY_MARGIN,
}
#: make_results: where this setting differs from the paper's, printed beside the verdicts.
DIFFERENCES = ("MiniLM-L6 (22 M parameters) instead of the paper's larger encoders; AG News only (no "
               "DBpedia); 40 clients, 20 rounds and ranks 16/4 instead of 20/5; 2 CPU cores.")
#: make_results: the reading of the finished runs (2026-12-01, all 15 runs).
FINDINGS = (
    "The mechanism the paper describes is there and large: under zero padding the slots only the "
    "four rank-16 clients own (4-15) carry almost nothing at the end (summed slot norm 0.05 under "
    "naive zero padding, 0.04 under HetLoRA, against 40.6 under replication padding; the claim holds "
    "in every seed). That is, zero padding trains an effectively rank-4 adapter, and indeed it "
    "ends level with everyone at rank 4 (last-3 0.848 vs 0.847). But accuracy does not follow, "
    "because in this setting the adapters add little at all: the head-only control ends at 0.840, "
    "within 0.007 of replication padding (interval -0.031 to +0.045). So the extra capacity that "
    "replication padding keeps alive has no accuracy to show for it here; every accuracy and "
    "speed claim is underpowered around zero (90% paired intervals about +-0.012, just wider than "
    "the +-0.01 margin; 3-5 paired seeds would show them equivalent at the observed spread). The "
    "first-aggregation diagnostic measured only seed 0, where a rank-16 client took part in round "
    "0: in seeds 1 and 2 the highest-rank participant had rank 4, and every arm gave it the same "
    "model (difference 0). A task where the encoder must change (a harder task, a weaker head, or "
    "a frozen head) is what would let replication padding's kept slots matter. Seeds 3 and 4 (2026-12-07, "
    "for the claims that 4-5 seeds looked able to decide; no claim or margin changed): replication padding "
    "learns faster than zero padding in all 5 seeds (AUC +0.005 / +0.002 / +0.008 / +0.023 / +0.014, "
    "+0.011 [+0.0002, +0.0212]: holds, by about the margin), but its end point does not follow: seed 4's "
    "curves swing with the sampled clients (replication 0.861 -> 0.795 -> 0.849 -> 0.780 over its last four "
    "evaluations, zero padding 0.851 -> 0.719 -> 0.868 -> 0.784), and its last-3 gap of -0.023 (-0.035 vs "
    "HetLoRA, -0.021 vs rank 4) widens every end-point interval: against zero padding -0.003 [-0.0155, "
    "+0.0092] (90%), HetLoRA -0.010, rank 4 -0.003, each underpowered (6-8 paired seeds at this spread). "
    "HetLoRA's claim was equivalent within +-0.01 at 4 seeds and is not at 5.")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="byun_lee", model="all-MiniLM-L6-v2", dataset="agnews", test_split="test", max_length=40,
        train_limit=10000, test_limit=1000, num_clients=40, clients_per_round=8, rounds=20,
        local_steps=8, batch_size=16, partition="dirichlet", client_groups=GROUPS, r_max=16,
        lora_alpha=32.0, target_modules=("query", "value"), algorithm="replication", lr=2e-3,
        chunk_size=8, eval_every=2, eval_batch_size=250, checkpoint_every=1000, diagnose_first_round=True,
    )
    return select_variant(cfg, variant, client_groups=((1, 10.0, 16), (3, 0.3, 4)))
