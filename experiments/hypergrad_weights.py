"""Learning server hyperparameters by hypergradient through the federated round (issue 20).

Two studies on the real MiniLM-L6 encoder fine-tuned on AG News (4 topics), CPU:

1. **Corrupted clients.** 8 clients (IID shares), 3 of them hold flipped labels
   (``y -> (y + 1) mod 4``). The server holds a small clean validation set (200 training
   examples no client sees). Arms: FedAvg (weights = example counts), the oracle fixed rule
   (corrupted clients weighted 0: the best any fixed rule can do), and **learned** weights:
   population logits ``theta [K]``, ``p = K softmax(theta) * n_k``, one Adam step (lr 0.2) per round on
   ``d val_loss(round(state; p)) / d theta`` (the round's own aggregation, one-round unroll:
   the online hypergradient), the state carried on is that round's output.
2. **Zero vs replication padding, learned per slot.** Ranks 1/2/4/8 (r_max 8) round-robin,
   Dirichlet(1.0) label skew, clean labels, aggregator ``mixed_padding``: per-slot
   ``g_i = sigmoid(phi_i)`` between zero padding (``g=0``) and replication padding (``g=1``),
   shared by the query/value modules of every layer. Arms: ``g=0``, ``g=1``, learned
   (``phi`` starts at 0, i.e. ``g=0.5``).

Every arm of a study runs the same compiled round (hyperparameters are array inputs). Test
accuracy on 1000 AG News test sentences every 5 rounds. Resumable: each (study, arm, seed)
writes ``experiments/results/hypergrad/<study>_<arm>_s<seed>.json`` atomically when it
finishes and is skipped when present.

Run: ``python experiments/hypergrad_weights.py [--rounds 20] [--seeds 0 1] [--smoke]``;
``--report`` rewrites the table ``experiments/results/hypergrad/README.md`` from the finished arms.
(``--smoke``: 2 rounds on a tiny subset, into a temporary folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax import aggregation as ag
from fedlora_jax import data as data_lib
from fedlora_jax._atomic import atomic_write_bytes, atomic_write_json
from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.driver.setup import build_setup
from fedlora_jax.driver.tasks import make_evaluate
from fedlora_jax.federated import (
    ServerHyper,
    init_server_state,
    make_round,
    make_spec,
    round_key,
    with_client_weights,
)
from fedlora_jax.lora import init as lora_init

OUT = Path(__file__).resolve().parent / "results" / "hypergrad"
K, CORRUPT, VAL_SIZE, HYPER_LR = 8, (0, 1, 2), 200, 0.2
STUDIES = {"corrupted": ("fedavg", "oracle", "learned"), "padding": ("zero", "replication", "learned")}


def config(study: str, seed: int, rounds: int, smoke: bool) -> ExperimentConfig:
    hetero = study == "padding"
    cfg = ExperimentConfig(
        name=f"hypergrad-{study}", model="all-MiniLM-L6-v2", dataset="agnews", max_length=32,
        train_limit=4000 + VAL_SIZE, test_limit=1000, num_clients=K, clients_per_round=K, rounds=rounds,
        local_steps=3, batch_size=16, partition="dirichlet" if hetero else "iid", dirichlet_alpha=1.0,
        r_max=8 if hetero else 4, lora_alpha=16.0 if hetero else 8.0, target_modules=("query", "value"),
        client_ranks=(1, 2, 4, 8) if hetero else (), algorithm="fedit", lr=1e-3, chunk_size=8,
        eval_batch_size=125, seed=seed)
    if smoke:
        cfg = dataclasses.replace(cfg, train_limit=400 + VAL_SIZE, test_limit=64, local_steps=1, batch_size=4,
                                  max_length=16, eval_batch_size=32)
    return cfg


def _replace(obj, **kw):
    return dataclasses.replace(obj, **kw) if dataclasses.is_dataclass(obj) else obj._replace(**kw)


def prepare(cfg: ExperimentConfig, study: str):
    """The driver's setup, a clean server validation set carved out of the training split,
    and (study 1) the corrupted clients' labels flipped."""
    setup = build_setup(cfg, quiet=True)
    rng = np.random.default_rng([cfg.seed, 7])
    labels = np.asarray(setup.train.labels).copy()
    val_idx = np.sort(rng.choice(len(labels), VAL_SIZE, replace=False))
    parts = [np.setdiff1d(np.asarray(p), val_idx) for p in setup.parts]
    if study == "corrupted":
        n_cls = len(setup.label_names)
        for c in CORRUPT:
            labels[parts[c]] = (labels[parts[c]] + 1) % n_cls
    train = setup.train._replace(labels=labels)
    val = {"input_ids": jnp.asarray(train.input_ids[val_idx]),
           "attention_mask": jnp.asarray(train.attention_mask[val_idx]),
           "labels": jnp.asarray(np.asarray(setup.train.labels)[val_idx]),   # clean labels
           "example_mask": jnp.ones(VAL_SIZE, jnp.int32)}
    return _replace(setup, train=train, parts=parts), val


def run_arm(study: str, arm: str, seed: int, rounds: int, smoke: bool, out: Path) -> dict:
    cfg = config(study, seed, rounds, smoke)
    setup, val = prepare(cfg, study)
    algo = setup.algo if study == "corrupted" else setup.algo._replace(aggregator=ag.mixed_padding())
    shapes = {k: (t.in_features, t.out_features) for k, t in setup.targets.items()}
    lora0 = lora_init(jax.random.fold_in(jax.random.key(seed), 11), shapes, cfg.r_max, scheme=algo.init_scheme)
    state = init_server_state(lora0, setup.head0, algo, num_clients=K)
    rf = make_round(setup.task, algo, optimizer=optax.adamw(cfg.lr), chunk_size=setup.chunk_size)
    evaluate = make_evaluate(setup.graphdef, scale=cfg.scale)
    full = {k: jnp.ones((cfg.r_max,), jnp.float32) for k in shapes}

    def val_loss(st):
        loss, _ = setup.task.loss({"lora": st.lora, "head": st.head}, setup.base, val, full, 0, None)
        return loss

    def hyper_of(theta):
        if study == "corrupted":
            return None
        g = jnp.full((cfg.r_max,), {"zero": 0.0, "replication": 1.0}.get(arm, 0.0))
        g = jax.nn.sigmoid(theta["phi"]) if arm == "learned" else g
        return ServerHyper(aggregation=ag.PaddingHyper(pad_mix=g))

    def weighted(theta, spec):
        if study == "corrupted" and arm == "learned":
            return with_client_weights(spec, K * jax.nn.softmax(theta["w"]))
        if study == "corrupted" and arm == "oracle":
            return with_client_weights(spec, jnp.asarray([0.0 if c in CORRUPT else 1.0 for c in range(K)]))
        return spec

    def objective(theta, st, batches, spec, key):
        sp = weighted(theta, spec)
        new, m = rf.jitted(st, batches, sp, key, setup.base, hyper_of(theta))
        return val_loss(new), (new, m)

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    theta = {"w": jnp.zeros(K), "phi": jnp.zeros(cfg.r_max)}
    hopt = optax.adam(HYPER_LR)
    hstate = hopt.init(theta)
    ids = np.arange(K, dtype=np.int32)
    history, t0 = [], time.time()
    for r in range(rounds):
        plan = algo.plan(state, ids, r)
        cb = data_lib.make_client_batches(setup.train, setup.parts, ids, steps=cfg.local_steps,
                                          batch_size=cfg.batch_size, seed=seed, round_idx=r)
        batches = {"input_ids": cb.input_ids, "attention_mask": cb.attention_mask, "labels": cb.labels,
                   "example_mask": cb.example_mask}
        spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=cb.num_steps,
                         weight=np.asarray(cb.num_examples, np.float32), client_id=ids,
                         num_layers=setup.ctx.num_layers, layer_of_key=setup.ctx.layer_of_key)
        (vloss, (state, m)), grad = step(theta, state, batches, spec, round_key(seed, r))
        if arm == "learned":
            upd, hstate = hopt.update(grad, hstate, theta)
            theta = optax.apply_updates(theta, upd)
        row = {"round": r + 1, "val_loss": float(vloss), "train_loss": float(m["train_loss"])}
        if arm == "learned":
            row["client_weight"] = np.round(np.asarray(jax.nn.softmax(theta["w"])) * K, 4).tolist()
            row["pad_mix"] = np.round(np.asarray(jax.nn.sigmoid(theta["phi"])), 4).tolist()
        if (r + 1) % 5 == 0 or r + 1 == rounds:
            acc, loss = evaluate(setup.base, state.head, state.lora, None, setup.test_batches)
            row["test_accuracy"], row["test_loss"] = float(acc), float(loss)
        history.append(row)
        print(f"[{study}/{arm}/s{seed}] round {r + 1}/{rounds} val {vloss:.4f} "
              f"acc {row.get('test_accuracy', float('nan')):.4f} ({time.time() - t0:.0f}s)", flush=True)
    res = {"study": study, "arm": arm, "seed": seed, "rounds": rounds, "history": history,
           "final_test_accuracy": history[-1]["test_accuracy"], "seconds": round(time.time() - t0, 1),
           "round_traces": rf.trace_count(), "config": cfg.to_dict(),
           "corrupted_clients": list(CORRUPT) if study == "corrupted" else [],
           "env": {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "machine": platform.processor()
                   or platform.machine(), "cpus": os.cpu_count()}}
    atomic_write_json(out / f"{study}_{arm}_s{seed}.json", res)
    return res


def report(out: Path) -> str:
    """Markdown table of every finished arm in ``out`` (also written to ``out/README.md``)."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*_s*.json"))]
    lines = ["| study | arm | seed | test acc (1000) | val loss | learned |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["study"], list(STUDIES[r["study"]]).index(r["arm"]), r["seed"])):
        last = r["history"][-1]
        learned = ""
        if r["arm"] == "learned" and r["study"] == "corrupted":
            w = np.asarray(last["client_weight"])
            bad = np.isin(np.arange(len(w)), r["corrupted_clients"])
            learned = (f"weight (x K, mean 1) corrupted {w[bad].mean():.3f}, clean {w[~bad].mean():.3f}: "
                       + " ".join(f"{x:.2f}" for x in w))
        elif r["arm"] == "learned":
            learned = "pad_mix per slot " + " ".join(f"{x:.2f}" for x in last["pad_mix"])
        lines.append(f"| {r['study']} | {r['arm']} | {r['seed']} | {r['final_test_accuracy']:.4f} | "
                     f"{last['val_loss']:.4f} | {learned} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "README.md", ("# Hypergradient study results (generated)\n\n" + text).encode())
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", action="store_true", help="only print/write the table of finished arms")
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.out or OUT))
        return 0
    out = a.out or (Path(tempfile.mkdtemp()) if a.smoke else OUT)
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for study in a.studies:
            for arm in STUDIES[study]:
                path = out / f"{study}_{arm}_s{seed}.json"
                if path.exists() and not a.smoke:
                    print(f"skip {path.name} (done)")
                    continue
                run_arm(study, arm, seed, 2 if a.smoke else a.rounds, a.smoke, out)
    print(report(out))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
