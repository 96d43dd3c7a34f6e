"""Quickstart: real MiniLM-L6 (installed from PyPI) fine-tuned federatedly on SST-2, on CPU.

Runbook:
  command:  .venv/bin/fedlora train --config experiments/configs/quickstart.py --out runs/quickstart
  hardware: any CPU (measured on 2 cores, see README)
  runtime:  2 min 40 s on a quiet 2-core CPU machine (measured 2026-11-25), 1 compilation
  expected: test accuracy 0.482 (untrained head) -> 0.780 after 8 rounds (measured, identical
            run to run on CPU); metrics.jsonl, checkpoints/ and plots/ are written.
  export:   fedlora export-peft runs/quickstart --out runs/quickstart-peft writes a FEATURE_EXTRACTION
            adapter for transformers' AutoModel + the trained head: MiniLM pools by the mean of the
            tokens, BertForSequenceClassification by its untrained pooler, so that class is not the one
            to load (README "Using an exported adapter in peft + transformers" has the code).

Setup: 20 clients with Dirichlet(1.0) label skew over an 8,000-sentence SST-2 subset,
heterogeneous LoRA ranks (2, 4, 8 round-robin, r_max = 8) on query/value, replication padding
(Byun & Lee) aggregation, 8 clients per round, 5 local AdamW steps of 16 sentences, 8 rounds.
(With Dirichlet(0.5) on this binary task the global model stays at the majority class for
the first rounds: client drift on the new head; measured, see README.)
"""

from fedlora_jax.driver.config import ExperimentConfig


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="quickstart",
        model="all-MiniLM-L6-v2",
        dataset="sst2",
        max_length=48,
        train_limit=8000,
        num_clients=20,
        clients_per_round=8,
        rounds=8,
        local_steps=5,
        batch_size=16,
        partition="dirichlet",
        dirichlet_alpha=1.0,
        r_max=8,
        lora_alpha=16.0,
        target_modules=("query", "value"),
        client_ranks=(2, 4, 8),
        algorithm="replication",
        device_mix=("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb"),
        lr=1e-3,
        chunk_size=8,
        eval_batch_size=128,
        seed=0,
    )
    if variant == "smoke":
        import dataclasses

        cfg = dataclasses.replace(cfg, name="quickstart-smoke", train_limit=400, test_limit=64, num_clients=4,
                                  clients_per_round=2, rounds=2, local_steps=2, batch_size=4, max_length=16,
                                  chunk_size=2, eval_batch_size=32)
    return cfg
