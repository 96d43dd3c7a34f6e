"""LEGEND (arXiv 2412.20004): each device's LoRA depth and rank ramp (higher ranks near the
output) chosen from its capability, against uniform LoRA (every client at r_max on every
layer) and against the same per-device payload placed on the bottom layers; non-IID AG News on a
simulated mix of Jetson AGX Orin, Orin Nano, Raspberry Pi 5 and a Snapdragon 8 Gen 2 phone.

Claims tested: LEGEND reaches the target accuracy in less simulated time (the paper: 1.5-2.8x
speedup) and with less uplink traffic (~42% less) than uniform LoRA; placing the adapters near
the output matters (the same payload on the bottom layers learns less).

Arms (paired by seed: the same data and the same sampled clients in every arm):
  legend          LCD configurator with a fixed deadline between the devices' full-config times
                  (``deadline="between"``, so the slow devices get intermediate depths and ranks)
  bottom_control  the same per-device depths and ranks mirrored onto the bottom layers
  uniform_fedit   FedIT, every client at rank 8 on every layer
  head_only       no adapter: only the classifier head is federated (the adapters' share)
The plan (depth and ranks per device type) is printed on the results page from the first
round's masks.

Runbook:
  command:  .venv/bin/python experiments/run_comparison.py --config experiments/configs/legend.py
            (4 arms x 3 seeds = 12 runs, resumable; results in experiments/results/legend/;
            then python experiments/make_results.py)
  seeds 3, 4: added 2026-12-07 (issue 32) after the 3-seed verdicts: "near the output beats the
            bottom layers" needs 3-5 paired seeds and "adapters add to the head alone" has its mean
            outside the margin with a 95% interval just crossing 0, so legend, bottom_control and
            head_only run seeds 3 and 4; uniform_fedit's claims are decided (accuracy) or need
            14-20 seeds (to target) and stay at 3. No claim or margin changed. Command:
            run_comparison.py --config experiments/configs/legend.py --seeds 3 4 \
              --only legend bottom_control head_only
  hardware: CPU, 2 cores (no accelerator); device times are SIMULATED by the cost model.
  runtime:  measured (2026-11/12, jax 0.10.2): 12 runs, 114.7 min of wall time in all, over the
            budget of about an hour; part of it with two comparisons sharing the 2 cores.
            About 88 min on quiet cores (the sum over arms of each arm's fastest run). Each run's
            wall time is in its summary.json (``wall_s``), the total on the results page.

Setup: real MiniLM-L6 encoder (all-MiniLM-L6-v2), 8,000 AG News training articles (4 classes,
max 40 tokens) over 40 clients with Dirichlet(1.0) label skew, the four device types
round-robin; LoRA r_max 8 on query/value; 8 clients per round; 20 rounds of 6 local AdamW steps
of 16 articles (lr 2e-3); evaluated every 2 rounds on the first 1,000 test articles.
``cut_variants`` (bit-identical, tested) removes the backward pass below each client's depth.
"""

import sys
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, select_variant

sys.path.insert(0, str(Path(__file__).parent))
from _base import ACCURACY_MARGIN_1000  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)

METHODS = {
    "legend": {"algorithm": "legend", "algo": {"deadline": "between"}},
    "bottom_control": {"algorithm": "legend", "algo": {"deadline": "between", "placement": "bottom"},
                       "cut_variants": ()},
    "uniform_fedit": {"algorithm": "fedit", "cut_variants": ()},
    "head_only": {"algorithm": "head_only", "cut_variants": ()},
}

#: make_results: the target accuracy is this fraction of the reference arm's mean last-3 accuracy.
TARGET = {"fraction": 0.95, "reference": "uniform_fedit"}
#: make_results: paired comparisons per seed (arm - ref), in the direction the paper claims.
CLAIMS = (
    {"claim": "LEGEND reaches the target in less simulated time than uniform LoRA (paper: 1.5-2.8x)",
     "arm": "legend", "ref": "uniform_fedit", "metric": "sim_s_to_target", "direction": -1},
    {"claim": "LEGEND sends less to the target than uniform LoRA (paper: ~42% less)",
     "arm": "legend", "ref": "uniform_fedit", "metric": "mb_to_target", "direction": -1},
    {"claim": "adapters near the output beat the same payload on the bottom layers",
     "arm": "legend", "ref": "bottom_control", "metric": "last3_acc", "direction": +1},
    {"claim": "adapters near the output reach the target sooner than on the bottom layers",
     "arm": "legend", "ref": "bottom_control", "metric": "sim_s_to_target", "direction": -1},
    {"claim": "LEGEND keeps uniform LoRA's accuracy (not-worse, tested as better)",
     "arm": "legend", "ref": "uniform_fedit", "metric": "last3_acc", "direction": +1},
    {"claim": "the adapters add to the head alone",
     "arm": "legend", "ref": "head_only", "metric": "last3_acc", "direction": +1},
)
#: make_results: the equivalence margin of each claimed metric, in its units, with the reason printed on
#: the page. Declared 2026-12-06 (issue 32), after the runs now on the page; fixed before any further run.
ACCURACY_MARGIN = ACCURACY_MARGIN_1000
MARGINS = {
    "sim_s_to_target": {"delta": 5.3, "reason": "one round of uniform LoRA's simulated time (106.8 s / 20 "
                        "rounds); the metric moves in steps of one evaluation (2 rounds)"},
    "mb_to_target": {"delta": 2.4, "reason": "one round of uniform LoRA's uplink (48.17 MB / 20 rounds); the "
                     "metric moves in steps of one evaluation (2 rounds)"},
    "last3_acc": ACCURACY_MARGIN,
}
#: make_results: where this setting differs from the paper's, printed beside the verdicts.
DIFFERENCES = ("MiniLM-L6 (6 layers) instead of the paper's deeper models; AG News only; device times come from "
               "the library's cost model, not from the paper's testbed; the fixed deadline between the devices' "
               "full-config times is an ASSUMPTION (fedlora_jax/algorithms/legend.py::deadline_between).")


#: make_results: the reading of the finished runs (2026-12-01: all 12 runs).
FINDINGS = (
    "One claim is decided, against the paper: LEGEND loses accuracy to uniform LoRA in every seed (last-3 "
    "0.850 against 0.868; -0.018, interval [-0.0310, -0.0045]: does not hold, reversed). The plan ramps: AGX "
    "Orin 8 on all 6 layers, Orin Nano 5/6/8/8/8/8 from the bottom, Raspberry Pi and phone depth 1 at rank 1 "
    "on the top layer. To the target LEGEND is faster in seeds 0 and 1 (-7.9 and -17.9 simulated s, -4.96 and "
    "-9.32 MB) and slower in seed 2 (+9.0 s, +0.65 MB), so the means (1.26x less time, 1.55x less uplink; the "
    "paper: 1.5-2.8x and ~42% less) are underpowered (20 and 14 paired seeds would narrow the intervals "
    "to one round); over the run it sends 2.1x less (23.02 against 48.17 MB) "
    "and takes 1.8x less simulated time (59.5 against 106.8 s). The same payload on the bottom layers ends "
    "level (+0.005, underpowered) but takes 2.50x longer to the target (underpowered) and 1.7x more "
    "simulated "
    "time over the run (102.6 against 59.5 s): an adapter at the bottom needs the backward pass through every "
    "layer above it, one at the top only through its own, which is where the placement's saving comes from in "
    "the cost model. The head-only control (last-3 0.839; the adapters add +0.012 [-0.0019, +0.0250]) reaches "
    "the target in 19.2 simulated s, sooner than LEGEND's 21.3: the target (0.95 x uniform's last-3) is within "
    "the head's reach, so time-to-target here mostly measures how fast the head trains. Seeds 3 and 4 "
    "(2026-12-07; LEGEND, the bottom-layer control and head only): near the output beats the bottom layers "
    "in all 5 seeds (+0.002 / +0.010 / +0.004 / +0.020 / +0.022; +0.012 [+0.0004, +0.0228]: holds); "
    "reaching the target sooner than the bottom layers stays underpowered (-29.0 s, but seed 3 is +3.5), "
    "and the adapters' gain over the head alone vanishes (the head alone is 0.034 and 0.019 above LEGEND in "
    "seeds 3 and 4: -0.004 over 5 seeds, underpowered, 15 seeds).")


def get_config(variant: str = "full") -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="legend", model="all-MiniLM-L6-v2", dataset="agnews", test_split="test", max_length=40,
        train_limit=8000, test_limit=1000, num_clients=40, clients_per_round=8, rounds=20,
        local_steps=6, batch_size=16, partition="dirichlet", dirichlet_alpha=1.0, r_max=8,
        lora_alpha=16.0, target_modules=("query", "value"), client_ranks=(),
        algorithm="legend", algo={"deadline": "between"},
        device_mix=("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb",
                    "phone_snapdragon_8_gen_2"),
        lr=2e-3, chunk_size=8, eval_every=2, eval_batch_size=250, checkpoint_every=1000, cut_variants=(0, 5),
    )
    return select_variant(cfg, variant)
