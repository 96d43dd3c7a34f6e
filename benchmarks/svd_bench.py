"""Benchmark: QR-core low-rank SVD vs dense ``jnp.linalg.svd`` of LoRA-style products.

Cases (each prints one JSON line per method, then one summary line):

* ``batch``: ``C`` independent products ``left[c] @ right[c]`` (``[C, M, r] @ [C, r, N]``),
  ``lowrank_svd`` vs ``dense_svd`` (forms ``[C, M, N]`` and calls ``jnp.linalg.svd``).
* ``stacked``: one weighted sum of ``S`` clients' products, ``stacked_lowrank_svd`` with
  ``method="lowrank"`` vs ``method="dense"``.

Compile time (``jit(...).lower(...).compile()``) and run time (min over ``--repeats`` of the
compiled call with ``block_until_ready``) are reported separately, with the relative
agreement of the top-``r`` singular values, ``max_i |s_low_i - s_dense_i| / s_dense_i``.
Dense timing can use a sub-batch (``--dense-batch``) on slow hardware; the speedup is then
per matrix and the line says so. Writes nothing unless ``--out`` is given.

Usage::

    python benchmarks/svd_bench.py                      # CPU: C=8, 1024 x 1024, r=8
    python benchmarks/svd_bench.py --preset gpu         # C=64, 4096 x 4096, r=16, 64 clients
    python benchmarks/svd_bench.py --out benchmarks/results/svd_cpu.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import env_meta, time_jit

from fedlora_jax.linalg import dense_svd, lowrank_svd, stacked_lowrank_svd

PRESETS = {
    "cpu": dict(clients=8, m=1024, n=1024, rank=8, stacked_clients=8, repeats=3,
                dense_batch=None),
    "gpu": dict(clients=64, m=4096, n=4096, rank=16, stacked_clients=64, repeats=3,
                dense_batch=None),
}


def _rel_agreement(s_low, s_dense) -> float:
    s_low, s_dense = np.asarray(s_low, np.float64), np.asarray(s_dense, np.float64)
    return float(np.max(np.abs(s_low - s_dense) / np.maximum(s_dense, 1e-30)))


def bench_batch(key, *, clients, m, n, rank, repeats, dense_batch, dtype) -> list[dict]:
    kl, kr = jax.random.split(key)
    left = jax.random.normal(kl, (clients, m, rank), dtype)
    right = jax.random.normal(kr, (clients, rank, n), dtype)
    db = clients if dense_batch is None else min(dense_batch, clients)
    c_low, t_low, res_low = time_jit(lambda a, b: lowrank_svd(a, b, rank=rank), (left, right),
                                  repeats)
    c_den, t_den, res_den = time_jit(lambda a, b: dense_svd(a, b, rank=rank),
                                  (left[:db], right[:db]), repeats)
    shape = dict(C=clients, M=m, N=n, r=rank, dtype=str(jnp.dtype(dtype)))
    rows = [
        {"kind": "timing", "case": "batch", "method": "lowrank", **shape, "batch_timed": clients,
         "compile_s": c_low, "run_s": t_low, "repeats": repeats},
        {"kind": "timing", "case": "batch", "method": "dense", **shape, "batch_timed": db,
         "compile_s": c_den, "run_s": t_den, "repeats": repeats},
    ]
    per_low, per_den = t_low / clients, t_den / db
    rows.append({"kind": "summary", "case": "batch", **shape,
                 "speedup_per_matrix": per_den / per_low,
                 "dense_extrapolated": db != clients,
                 "s_rel_agreement_max": _rel_agreement(res_low.s[:db], res_den.s)})
    return rows


def bench_stacked(key, *, stacked_clients, m, n, rank, repeats, dtype) -> list[dict]:
    kl, kr, kw = jax.random.split(key, 3)
    c = stacked_clients
    left = jax.random.normal(kl, (c, m, rank), dtype)
    right = jax.random.normal(kr, (c, rank, n), dtype)
    w = jax.random.uniform(kw, (c,), jnp.float32, 0.5, 1.5)
    shape = dict(C=c, M=m, N=n, r=rank, CK=c * rank, dtype=str(jnp.dtype(dtype)))
    rows, outs = [], {}
    for method in ("lowrank", "dense"):
        fn = lambda a, b, ww, method=method: stacked_lowrank_svd(a, b, ww, rank=rank,
                                                                  method=method)
        comp, run, outs[method] = time_jit(fn, (left, right, w), repeats)
        rows.append({"kind": "timing", "case": "stacked", "method": method, **shape,
                     "compile_s": comp, "run_s": run, "repeats": repeats})
    rows.append({"kind": "summary", "case": "stacked", **shape,
                 "speedup": rows[1]["run_s"] / rows[0]["run_s"],
                 "s_rel_agreement_max": _rel_agreement(outs["lowrank"].s, outs["dense"].s)})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--clients", type=int, help="C: products in the batch case")
    parser.add_argument("--m", type=int, help="M: rows of each product")
    parser.add_argument("--n", type=int, help="N: columns of each product")
    parser.add_argument("--rank", type=int, help="r: inner size and truncation rank")
    parser.add_argument("--stacked-clients", type=int,
                        help="clients in the stacked-sum case (0 skips it)")
    parser.add_argument("--repeats", type=int, help="timed runs (min is reported)")
    parser.add_argument("--dense-batch", type=int,
                        help="time dense SVD on only this many products (per-matrix speedup)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the factors (compute is float32 either way)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write all JSON records to this file (JSON list)")
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for name in ("clients", "m", "n", "rank", "stacked_clients", "repeats", "dense_batch"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    dtype = jnp.dtype(args.dtype)
    key = jax.random.key(args.seed)
    k1, k2 = jax.random.split(key)
    records = [{**env_meta(), "preset": args.preset, "config": cfg}]
    print(json.dumps(records[0]), flush=True)

    def emit(rows):
        for row in rows:
            records.append(row)
            print(json.dumps(row), flush=True)

    emit(bench_batch(k1, clients=cfg["clients"], m=cfg["m"], n=cfg["n"], rank=cfg["rank"],
                     repeats=cfg["repeats"], dense_batch=cfg["dense_batch"], dtype=dtype))
    if cfg["stacked_clients"]:
        emit(bench_stacked(k2, stacked_clients=cfg["stacked_clients"], m=cfg["m"], n=cfg["n"],
                           rank=cfg["rank"], repeats=cfg["repeats"], dtype=dtype))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
