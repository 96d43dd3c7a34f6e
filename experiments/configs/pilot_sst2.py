"""Pilot (issue 32): does SST-2 leave the adapters room over the head alone?

Question: in the quickstart's setting (MiniLM-L6, SST-2, 20 clients with Dirichlet(1.0) label
skew, 8 per round, 5 local AdamW steps of 16 sentences), the head-only control ended at 0.710 and
replication-padded LoRA at 0.780 after 8 rounds (seed 0). Where does the gap settle with more
rounds, and is it at least 0.05 (the issue's bar: more than 3 binomial standard errors of the
872-sentence test split, 3 x sqrt(0.8 x 0.2 / 872) = 0.041) in both seeds?

Arms (paired by seed):
  head_only  no adapter: only the classifier head is federated
  fedit_r8   the plainest LoRA arm: every client at rank 8 on query/value, FedIT averaging

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/pilot_sst2.py
            (2 arms x 2 seeds = 4 runs, resumable; results in experiments/results/pilot_sst2/;
            then python experiments/make_results.py, which prints the pilot's table)
  hardware: CPU, 2 cores (no accelerator)
  runtime:  measured in each run's summary.json (``wall_s``) and on the results page.
  decision: keep the setting for the rebuilt comparisons only if fedit_r8 - head_only >= 0.05
            (last-3 evaluations) in both seeds.

Stopped after seed 0 (2026-12-07): the rule needs the gain in every seed and seed 0 already
falls short, so seed 1 could not change the decision; its CPU went to the next pilot.
"""

from fedlora_jax.driver.config import ExperimentConfig, select_variant

SEEDS = (0, 1)
METHODS = {
    "head_only": {"algorithm": "head_only"},
    "fedit_r8": {"algorithm": "fedit"},
}
#: make_results: a pilot has one rule, the room the adapters leave over the head alone.
PILOT = {"arm": "fedit_r8", "control": "head_only", "metric": "last3_acc", "min_gain": 0.05}
#: make_results: the reading of the finished runs (2026-12-07, seed 0).
FINDINGS = (
    "The quickstart's gap (0.07 after 8 rounds) was a head start, not room: by round 30 the head alone "
    "has climbed to 0.766 (last three evaluations 0.755, 0.767, 0.766) while FedIT at rank 8 ends at 0.776 "
    "(0.744, 0.797, 0.787; it was ahead from round 4 on, with dips to 0.66 under the label skew), a gain of "
    "0.013, under the 0.05 bar. The adapters do learn faster here (at round 6 FedIT is at 0.759 and the head "
    "alone at 0.686), so SST-2 could test a speed claim, not an end-accuracy one. Dropped.")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="pilot_sst2", model="all-MiniLM-L6-v2", dataset="sst2", max_length=48, train_limit=8000,
        test_limit=0, num_clients=20, clients_per_round=8, rounds=30, local_steps=5, batch_size=16,
        partition="dirichlet", dirichlet_alpha=1.0, r_max=8, lora_alpha=16.0, target_modules=("query", "value"),
        client_ranks=(8,), algorithm="fedit", lr=1e-3, chunk_size=8, eval_every=2, eval_batch_size=218,
        checkpoint_every=1000,
    )
    return select_variant(cfg, variant)

