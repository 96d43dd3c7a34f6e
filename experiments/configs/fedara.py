"""FedARA (arXiv 2501.14406): truncated-SVD adapters with a cubic rank budget, importance-based
global allocation and module pruning, against fixed-rank LoRA at the start rank r0, fixed-rank
LoRA at the target budget, and AdaLoRA run federatedly; non-IID AG News on a simulated
Jetson AGX Orin / Orin Nano / Raspberry Pi 5 device mix.

Claims tested: FedARA keeps the accuracy of fixed rank r0 under non-IID data while sending less
(the paper: 2.40x less communication) and taking less simulated time and energy (up to 48.9% /
46.95% less) to the target accuracy; it beats fixed rank at the same final budget and AdaLoRA.

Arms (paired by seed: the same data and the same sampled clients in every arm):
  fedara          SVD form, cubic budget r0 12 -> 4 per module (t_init 0.25 T, t_final 0.25 T),
                  nested global masks, smoothed scores, pruning of empty modules
  fixed_r12       FedIT, every client at rank 12 = r0 (the paper's fixed-rank baseline)
  fixed_r4        FedIT, every client at rank 4 (the same final budget as FedARA)
  adalora         AdaLoRA run federatedly (unmasked forward, lambda zeroed in place,
                  non-nested allocation, full-rank traffic)
  head_only       no adapter: only the classifier head is federated (the adapters' share)

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/fedara.py
            (5 arms x 3 seeds = 15 runs, resumable; results in experiments/results/fedara/;
            then python experiments/make_results.py)
  seeds 3, 4: added 2026-12-07 (issue 32) after the 3-seed verdicts: "FedARA beats fixed rank at
            the same final budget" needs 4 paired seeds at the observed spread, so fedara and
            fixed_r4 run seed 3 (and 4 if 4 do not decide); the other accuracy claims need 8-31
            seeds and were left at 3. No claim or margin changed. Command:
            run_comparison.py --config experiments/configs/fedara.py --seeds 3 --only fedara fixed_r4
  hardware: CPU, 2 cores (no accelerator); device times and energy are SIMULATED by
            fedlora_jax.devices' cost model, not measured on Jetsons.
  runtime:  measured (2026-11/12, jax 0.10.2): 15 runs, 138.5 min of wall time in all, over the
            budget of about an hour; part of it with two comparisons sharing the 2 cores.
            About 109 min on quiet cores (the sum over arms of each arm's fastest run). Each run's
            wall time is in its summary.json (``wall_s``), the total on the results page.

Setup: real MiniLM-L6 encoder (all-MiniLM-L6-v2), 6,000 AG News training articles (4 classes,
max 40 tokens) over 20 clients with Dirichlet(0.5) label skew; LoRA on query/key/value/attn_out
of every layer (24 modules), r_max 12; 5 clients per round; 20 rounds of 6 local AdamW steps of
16 articles (lr 2e-3); evaluated every 2 rounds on the first 1,000 test articles.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, select_variant

sys.path.insert(0, str(Path(__file__).parent))
from _base import ACCURACY_MARGIN_1000  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)

METHODS = {
    "fedara": {"algorithm": "fedara", "algo": {"target_rank": 4}},
    "fixed_r12": {"algorithm": "fedit"},
    "fixed_r4": {"algorithm": "fedit", "client_ranks": (4,)},
    "adalora": {"algorithm": "adalora", "algo": {"target_rank": 4}},
    "head_only": {"algorithm": "head_only"},
}

#: make_results: the target accuracy is this fraction of the reference arm's mean last-3 accuracy.
TARGET = {"fraction": 0.95, "reference": "fixed_r12"}
#: make_results: paired comparisons per seed (arm - ref), in the direction the paper claims.
CLAIMS = (
    {"claim": "FedARA sends less than fixed rank r0 to the target accuracy (paper: 2.40x less)",
     "arm": "fedara", "ref": "fixed_r12", "metric": "mb_to_target", "direction": -1},
    {"claim": "FedARA takes less simulated time than fixed rank r0 to the target (paper: up to 48.9% less)",
     "arm": "fedara", "ref": "fixed_r12", "metric": "sim_s_to_target", "direction": -1},
    {"claim": "FedARA uses less simulated energy than fixed rank r0 over the run (paper: up to 46.95% less)",
     "arm": "fedara", "ref": "fixed_r12", "metric": "total_energy_kj", "direction": -1},
    {"claim": "FedARA sends less than fixed rank r0 over the run",
     "arm": "fedara", "ref": "fixed_r12", "metric": "total_mb", "direction": -1},
    {"claim": "FedARA keeps the accuracy of fixed rank r0 (non-IID); the claim is not-worse, tested as "
              "better",
     "arm": "fedara", "ref": "fixed_r12", "metric": "last3_acc", "direction": +1},
    {"claim": "FedARA beats fixed rank at the same final budget",
     "arm": "fedara", "ref": "fixed_r4", "metric": "last3_acc", "direction": +1},
    {"claim": "FedARA beats AdaLoRA run federatedly",
     "arm": "fedara", "ref": "adalora", "metric": "last3_acc", "direction": +1},
    {"claim": "the adapters add to the head alone",
     "arm": "fedara", "ref": "head_only", "metric": "last3_acc", "direction": +1},
)
#: make_results: the equivalence margin of each claimed metric, in its units, with the reason printed on
#: the page. Declared 2026-12-06 (issue 32), after the runs now on the page; fixed before any further run.
ACCURACY_MARGIN = ACCURACY_MARGIN_1000
MARGINS = {
    "mb_to_target": {"delta": 4.45, "reason": "one round of fixed r12's uplink (89.09 MB / 20 rounds); the "
                     "metric moves in steps of one evaluation (2 rounds)"},
    "sim_s_to_target": {"delta": 5.0, "reason": "one round of fixed r12's simulated time (100.1 s / 20 "
                        "rounds); the metric moves in steps of one evaluation (2 rounds)"},
    "total_energy_kj": {"delta": 0.062, "reason": "5% of fixed r12's simulated energy over the run (1.237 "
                        "kJ), a tenth of the paper's claimed 46.95%"},
    "total_mb": {"delta": 4.45, "reason": "5% of fixed r12's uplink over the run (89.09 MB), one round of it; "
                 "the paper claims 58% less (2.40x)"},
    "last3_acc": ACCURACY_MARGIN,
}
#: make_results: where this setting differs from the paper's, printed beside the verdicts.
DIFFERENCES = ("MiniLM-L6 instead of the paper's models; AG News only; 20 rounds; device time and energy come "
               "from the library's cost model (FLOPs / peak, bytes / bandwidth, board power), not from Jetson "
               "Orin / Raspberry Pi 5 measurements; the paper's schedule constants are ASSUMPTIONS "
               "(fedlora_jax/algorithms/fedara.py).")


#: make_results: the reading of the finished runs (2026-12-01: all 15 runs).
FINDINGS = (
    "Two claims hold, both smaller than the paper's: FedARA sends 1.65x less over the run than fixed rank r0 "
    "(53.85 against 89.09 MB in every seed; the paper: 2.40x) and uses 1.04x less simulated energy (-0.042 "
    "kJ, interval [-0.0500, -0.0345]; the paper: up to 46.95% less). Per round its uplink falls from 4.47 MB "
    "to 1.51 MB as the budget descends (3.0x), but the first 6 rounds are at r0 (warm-up t_init = 0.25 T). To"
    " the target the saving is about nil (1.05x in MB, 1.01x in simulated time: equivalent within one "
    "round of fixed r12's uplink and simulated time): the target "
    "(0.95 x fixed r12's last-3 accuracy) is reached after 6.7 rounds on average, at the end of the warm-up, "
    "when FedARA has sent what fixed r12 sent. Time and energy barely move because the simulated round is the"
    " slowest sampled client's compute (a Raspberry Pi at 6.1 s against 0.5 s for the Jetsons), dominated by "
    "the frozen encoder's forward and backward pass: FedARA prunes 3-4 of the 24 modules (layer 0's query and"
    " key, and one or two more) but never a whole bottom layer, so the lowest active layer stays 0 and no "
    "backward pass is removed (grad_cut 0 in every round); the rank cut alone takes the Pi's round from 6.1 "
    "to 5.7 s. The paper's time and energy savings need whole low layers pruned. Accuracy: FedARA, fixed r12,"
    " fixed r4 and AdaLoRA end within 0.01 of each other (last-3 0.827 / 0.823 / 0.826 / 0.830), every "
    "accuracy claim underpowered except against AdaLoRA (equivalent within +-0.01); fixed rank 4 reaches the "
    "target with 10.04 MB, a third of FedARA's 28.26, "
    "so on this task the final budget alone would do. The head-only control ends at 0.817 last-3 (the "
    "adapters add +0.010 [-0.0708, +0.0906]). Where the budget goes (the final allocation table, mean over "
    "seeds): 8.0-10.3 triplets in each of layers 0-2 and 20.0-28.0 in layers 3-5, so the importance rule does"
    " favour the top layers, but not enough to empty one (in `fedara_prune` a quarter of the budget empties "
    "layer 2 in every seed but layer 0 in only one, which saves 1.09x of the simulated time over the run). "
    "AdaLoRA's per-module ranks are FedARA's in every round but 3-5 rounds of the middle phase (at most 4 "
    "triplets apart in all) and identical at the end in every seed: its masked triplets restart from lambda ="
    " 0 each round, and by the final phase none has come back, so the two differ in what they send (89.32 "
    "against 53.85 MB), not in what they keep. Seed 3 (2026-12-07, FedARA and fixed r4 only, because 4 "
    "paired seeds looked enough): FedARA vs fixed rank r4 at the same final budget +0.003, so over 4 seeds "
    "+0.001 [-0.0065, +0.0082] (90%): equivalent within +-0.01; the importance-driven allocation buys no "
    "accuracy over a fixed rank of the budget it ends at, and costs none.")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="fedara", model="all-MiniLM-L6-v2", dataset="agnews", test_split="test", max_length=40,
        train_limit=6000, test_limit=1000, num_clients=20, clients_per_round=5, rounds=20,
        local_steps=6, batch_size=16, partition="dirichlet", dirichlet_alpha=0.5, r_max=12,
        lora_alpha=24.0, target_modules=("query", "key", "value", "attn_out"), client_ranks=(),
        algorithm="fedara", algo={"target_rank": 4},
        device_mix=("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb"),
        lr=2e-3, chunk_size=5, eval_every=2, eval_batch_size=250, checkpoint_every=1000,
    )
    # smoke: two adapted modules (more modules compile too slowly for CI)
    return select_variant(cfg, variant, target_modules=("query", "value"))
