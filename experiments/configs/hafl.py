"""HAFL (arXiv 2411.06581): rank-1 freezing + rank-1 adaptive aggregation vs HetLoRA zero
padding vs FlexLoRA, heterogeneous ranks, non-IID Dirichlet label skew, AG News.

Runbook:
  command:  python experiments/run_comparison.py --config experiments/configs/hafl.py
            (3 methods x 3 seeds x SWEEP dirichlet_alpha; results in experiments/results/hafl/;
            then python experiments/make_results.py)
  hardware: CPU, 2 cores shared (no accelerator)
  runtime:  ~35-77 s per run (2 CPU cores shared with other jobs), 9 runs per alpha for the
            3 methods; all 27 runs took 23.0 min.
  expected: (measured, mean over 3 seeds, last-3 test accuracy; 4 classes, chance 0.25)
            alpha 0.1: HAFL 0.505 vs zero padding 0.631 (both oscillate strongly, best-round
            0.71 / 0.74; FlexLoRA 0.642); alpha 0.5: HAFL 0.763 vs 0.741 (FlexLoRA 0.754);
            alpha 1.0: HAFL 0.801 vs zero padding 0.804 (FlexLoRA 0.811). Uplink identical
            (7.2 MB); HAFL's simulated energy is higher (full-rank forward on every client).

Setup: real MiniLM-L6 encoder, 3,000 AG News training articles (4 classes, max 40 tokens) over
20 clients with Dirichlet(alpha) label skew, ranks 2/4/8 round-robin (r_max 8) on query/value,
5 clients per round, 4 local AdamW steps of 8 articles (lr 2e-3), 8 rounds, test on the first
256 articles of the test split. SWEEP lists alpha 0.5 last so that it is the value dropped
when CPU time runs short.
"""

from fedlora_jax.driver.config import ExperimentConfig, select_variant

SEEDS = (0, 1, 2)
SWEEP = {"dirichlet_alpha": (0.1, 1.0, 0.5)}

METHODS = {
    "hafl_freeze": {"algorithm": "hafl", "algo": {"mode": "freeze"}},
    "zero_padding": {"algorithm": "hetlora"},
    "flexlora": {"algorithm": "flexlora"},
}


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="hafl", model="all-MiniLM-L6-v2", dataset="agnews", test_split="test", max_length=40,
        train_limit=3000, test_limit=256, num_clients=20, clients_per_round=5, rounds=8,
        local_steps=4, batch_size=8, partition="dirichlet", dirichlet_alpha=0.5, r_max=8,
        lora_alpha=16.0, target_modules=("query", "value"), client_ranks=(2, 4, 8),
        algorithm="hafl", algo={"mode": "freeze"}, lr=2e-3, chunk_size=5, eval_every=1,
        eval_batch_size=128, checkpoint_every=1000,
    )
    return select_variant(cfg, variant)
