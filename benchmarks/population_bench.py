"""Large populations on one machine: per-client state of 1,000 / 10,000 clients (issue 21.3).

FedSA-LoRA keeps every client's ``b`` factors (MiniLM shape, query/value of 6 layers, r 8:
about 147 KB per client); HAFL keeps a score history per client. With
``client_state_on_host`` the population lives in host memory as NumPy arrays and each round
moves only the sampled clients' slices. For each population size and placement this measures
the population's bytes (from shapes), the state's init time, the process's peak RSS and the
per-round time of a small round (C sampled clients, 1 step), against the same round with a
population of C (the overhead is the difference). A random-weight MiniLM-shape model.

Run: ``python benchmarks/population_bench.py --populations 1000 10000 --out benchmarks/results/population_cpu.jsonl``
(each configuration in its own process, so peak RSS is its own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    sys.path.insert(0, str(HERE))
    from _bench_common import env_meta
    from round_bench import SIZES, load_average, peak_rss_mb

    from fedlora_jax import lora as lora_lib
    from fedlora_jax.algorithms import AlgoContext, build_algorithm
    from fedlora_jax.driver.tasks import classification_task
    from fedlora_jax.federated import init_server_state, make_round, make_spec
    from fedlora_jax.federated.round import population_state_bytes
    from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
    from fedlora_jax.models.common import split_for_round

    size = SIZES["minilm"]
    cfg = EncoderConfig(model_type="bert", max_position_embeddings=512, num_labels=4, **size)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    graphdef, base, head = split_for_round(model)
    targets = model.adapter_targets(["query", "value"])
    keys = tuple(sorted(targets))
    shapes = {k: (targets[k].in_features, targets[k].out_features) for k in keys}
    K, C, R = a.population, a.clients, a.rank
    ctx = AlgoContext(keys=keys, layer_of_key={k: targets[k].layer for k in keys}, num_layers=cfg.num_layers,
                      r_max=R, client_ranks=np.full(K, R, np.int32), client_devices=np.zeros(K, np.int32),
                      rounds=a.rounds, scale=2.0, aggregator_options={}, seed=0, device_profiles=(),
                      model_shape=None, batch_size=a.batch, local_steps=1, deadline_s=None)
    algo = build_algorithm(a.algorithm, ctx, **({"mode": "freeze"} if a.algorithm == "hafl" else {}))
    lora0 = lora_lib.init(jax.random.key(1), shapes, R, scheme=algo.init_scheme)
    host = a.placement == "host"
    t0 = time.perf_counter()
    state = init_server_state(lora0, head, algo, num_clients=K, client_state_on_host=host)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    rf = make_round(classification_task(graphdef, scale=2.0), algo, optimizer=optax.adamw(1e-4), chunk_size=2,
                    client_state_on_host=host)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(3, size["vocab_size"], (C, 1, a.batch, a.seq)), jnp.int32),
             "attention_mask": jnp.ones((C, 1, a.batch, a.seq), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 4, (C, 1, a.batch)), jnp.int32),
             "example_mask": jnp.ones((C, 1, a.batch), jnp.float32)}
    times = []
    for r in range(a.rounds + 1):                      # round 0 compiles
        ids = np.sort(rng.choice(K, C, replace=False)).astype(np.int32)
        plan = algo.plan(state, ids, r)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=np.ones(C), weight=np.ones(C),
                         client_id=ids, num_layers=cfg.num_layers, layer_of_key=ctx.layer_of_key)
        t = time.perf_counter()
        state, m = rf(state, batch, spec, jax.random.key(r), base)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    run = sorted(times[1:])
    return dict(env_meta(), kind="population", algorithm=a.algorithm, placement=a.placement, population=K,
                clients_per_round=C, batch=a.batch, seq=a.seq, rank=R,
                population_state_mb=round(population_state_bytes(algo, lora0, K) / 2**20, 1),
                init_s=round(init_s, 3), compile_round_s=round(times[0], 2),
                round_s_median=round(run[len(run) // 2], 4), round_s_min=round(run[0], 4),
                process_peak_rss_mb=peak_rss_mb(), traces=rf.trace_count(), load_average=load_average())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--populations", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--algorithms", nargs="+", default=["fedsa", "hafl"])
    ap.add_argument("--placements", nargs="+", default=["host", "device"], choices=["host", "device"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--population", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--placement", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a)), flush=True)
        return 0
    rows = []
    for alg in a.algorithms:
        for pop in [a.clients] + list(a.populations):
            for place in a.placements:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--population", str(pop),
                       "--algorithm", alg, "--placement", place, "--clients", str(a.clients), "--batch",
                       str(a.batch), "--seq", str(a.seq), "--rank", str(a.rank), "--rounds", str(a.rounds)]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"configuration {alg}/{pop}/{place} failed (exit {res.returncode})")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.out:
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print("| algorithm | placement | population | state MB | init s | round s (median) | peak RSS MB |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['algorithm']} | {r['placement']} | {r['population']} | {r['population_state_mb']} | "
              f"{r['init_s']} | {r['round_s_median']} | {r['process_peak_rss_mb']} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
