"""Byun & Lee (arXiv 2406.17477): replication padding vs zero padding (HetLoRA) vs FedIT vs
FlexLoRA under heterogeneous LoRA ranks, SST-2. ``naive_zero_padding`` (FedIT with the same
heterogeneous ranks: data weights, no renormalisation) is the paper's clean control beside
HetLoRA's norm-weighted zero padding (added 2026-12-01; not in the committed results below).
The paper's own setting (rank tied to data quality) is expressed with
``ExperimentConfig.client_groups``, e.g. ``client_groups=((4, 10.0, 16), (36, 0.3, 4))``.

Runbook:
  command:  python experiments/run_comparison.py --config experiments/configs/byun_lee.py
            (4 methods x 3 seeds = 12 runs; results in experiments/results/byun_lee/;
            then python experiments/make_results.py)
  hardware: CPU, 2 cores shared (no accelerator)
  runtime:  9.7 min for the 12 runs (27-91 s per run; 2 CPU cores shared with other jobs)
  expected: (measured, mean over 3 seeds) test accuracy ~0.50 untrained -> last-3 mean 0.734
            replication, 0.727 zero padding, 0.738 FlexLoRA (all within seed noise, std
            0.02-0.04), 0.754 FedIT at r_max with 11.9 MB vs 7.1 MB uplink.

Setup: real MiniLM-L6 encoder, 3,000 SST-2 training sentences (max 32 tokens) over 20 clients
with an IID split (label skew made the federated head flip between classes in
these short runs; see README), ranks 2/4/8 round-robin (r_max 8) on query/value, 5 clients
per round, 4 local AdamW steps of 8 sentences (lr 2e-3), 8 rounds, test on the first 256 test
sentences. FedIT trains every client at r_max (the homogeneous reference: it ignores the rank
heterogeneity, so it is an upper bound on capacity, not a heterogeneous method).
"""

from fedlora_jax.driver.config import ExperimentConfig, select_variant

SEEDS = (0, 1, 2)

METHODS = {
    "replication": {"algorithm": "replication"},
    "zero_padding": {"algorithm": "hetlora"},
    "naive_zero_padding": {"algorithm": "fedit"},
    "fedit_rmax": {"algorithm": "fedit", "client_ranks": ()},
    "flexlora": {"algorithm": "flexlora"},
}


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="byun_lee", model="all-MiniLM-L6-v2", dataset="sst2", max_length=32,
        train_limit=3000, test_limit=256, num_clients=20, clients_per_round=5, rounds=8,
        local_steps=4, batch_size=8, partition="iid", r_max=8,
        lora_alpha=16.0, target_modules=("query", "value"), client_ranks=(2, 4, 8),
        algorithm="replication", lr=2e-3, chunk_size=5, eval_every=1, eval_batch_size=128,
        checkpoint_every=1000,
    )
    return select_variant(cfg, variant)
