"""How stable are FedARA's aggregated triplet scores from round to round? (score_beta, warm-up)

FedARA allocates ranks from the server's aggregated importance scores. With a few local steps
per round those scores are noisy (``shared/research/fidelity_audit.md`` A8), so the library
smooths them across rounds (aggregator option ``score_beta``, FedARA's default 0.5) and keeps
the budget at ``b0`` for a warm-up of ``t_init_frac * T`` rounds. This script measures, through
the library's own compiled round (``fedlora_jax.driver.setup``), the Spearman rank correlation of
the allocator's input (``agg_state.scores`` over all triplets) between consecutive rounds, with
allocation switched off (``target_rank = r_max``) so that only the scores are compared.

    python experiments/fedara_score_stability.py [--rounds 10] [--betas 0 0.5] [--out FILE]

Writes one JSON line per (score_beta, round) to
``experiments/results/fedara_score_stability/stability.jsonl`` (atomically: the file is
rewritten through a temporary file) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from fedlora_jax.driver import setup as driver_run
from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.federated import round_key

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "fedara_score_stability" / "stability.jsonl"


def config(rounds: int, beta: float) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"fedara-stability-b{beta}", model="all-MiniLM-L6-v2", dataset="agnews", max_length=32,
        train_limit=2000, test_limit=64, num_clients=10, clients_per_round=4, rounds=rounds, local_steps=6,
        batch_size=8, partition="dirichlet", dirichlet_alpha=0.5, r_max=8, lora_alpha=16.0,
        target_modules=("query", "value"), algorithm="fedara", algo={"target_rank": 8},
        aggregator_options={"score_beta": beta}, lr=2e-3, chunk_size=4)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def flat_scores(state) -> np.ndarray:
    s = state.agg_state.scores
    return np.concatenate([np.asarray(s[k], np.float64) for k in sorted(s)])


def measure(rounds: int, beta: float) -> list[dict]:
    cfg = config(rounds, beta)
    setup = driver_run.build_setup(cfg, quiet=True)
    state = driver_run.init_state(setup)
    rf = driver_run.make_round_fn(setup)
    rows, prev = [], None
    for r in range(rounds):
        ids = driver_run.sample_clients(cfg, r)
        batch, steps, examples = driver_run.batches_for(setup, ids, r)
        plan = setup.algo.plan(state, ids, r)
        spec = driver_run.client_spec(setup, plan, ids, steps, examples.astype(np.float32))
        state, _ = rf(state, batch, spec, round_key(cfg.seed, r), setup.base)
        cur = flat_scores(state)
        top = int(0.25 * cur.size)
        row = {"score_beta": beta, "round": r, "spearman_vs_previous": None, "top_quarter_overlap": None}
        if prev is not None:
            row["spearman_vs_previous"] = round(spearman(prev, cur), 4)
            a, b = set(np.argsort(-prev)[:top]), set(np.argsort(-cur)[:top])
            row["top_quarter_overlap"] = round(len(a & b) / top, 4)
        rows.append(row)
        prev = cur
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "machine": platform.machine(),
            "cores": os.cpu_count(), "backend": jax.default_backend()}
    rows = []
    t0 = time.time()
    for beta in args.betas:
        rows += [dict(r, **meta) for r in measure(args.rounds, beta)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        tmp = f.name
    os.replace(tmp, out)
    print("| round | " + " | ".join(f"beta {b}: rho / top-25% overlap" for b in args.betas) + " |")
    for r in range(1, args.rounds):
        cells = [next(x for x in rows if x["score_beta"] == b and x["round"] == r) for b in args.betas]
        print(f"| {r} | " + " | ".join(f"{c['spearman_vs_previous']:.3f} / {c['top_quarter_overlap']:.2f}"
                                       for c in cells) + " |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
