"""Diagnostic for the FedARA comparison: can FedARA's importance empty whole bottom layers, and
does the simulated time then fall as the paper claims? The same setting as ``fedara.py`` with
the smallest budget, one triplet per module on average (``target_rank=1``: 24 of 288 triplets).

Why: in ``fedara.py`` (target 4, 96 triplets) FedARA's time and energy savings were small
(1.04x less energy; to the target about nil) because the simulated round is the slowest
client's compute, and the backward pass is only removed below the lowest layer that keeps an
active module. Its final allocation keeps 8-10 triplets in each of layers 0-2 (20-28 in layers
3-5: the table "Final allocation" on the results page), so every client trains from layer 0.
The question, stated before this run: with a budget a quarter as large, do the bottom layers
empty first (the allocation does favour the top layers), so that the lowest trained layer
rises above 0 and the Raspberry Pi's round falls clearly below fedara.py's 5.7 s? If layer 0
still keeps a module, the paper's time claim needs more than its importance rule gives here.

Arms:
  fedara_t1   FedARA as in fedara.py, target_rank 1 (cubic schedule 12 -> 1 per module)

Runbook:
  command:  python experiments/run_comparison.py --config experiments/configs/fedara_prune.py
            (1 arm x 3 seeds; seed 0 first; resumable; the same seeds and sampled clients
            as fedara.py, so its arms are the references)
  hardware: CPU, 2 cores (no accelerator); device times and energy SIMULATED as in fedara.py.
  runtime:  about 7-8 min per run on quiet cores (fedara.py's FedARA runs).
"""

import dataclasses
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_fedara_base", Path(__file__).with_name("fedara.py"))
_fedara = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fedara)

SEEDS = (0, 1, 2)
METHODS = {"fedara_t1": {"algorithm": "fedara", "algo": {"target_rank": 1}}}
DIFFERENCES = _fedara.DIFFERENCES


def get_config(variant: str = "full"):
    return dataclasses.replace(_fedara.get_config(variant), name="fedara_prune", algo={"target_rank": 1})
