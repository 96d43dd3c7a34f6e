"""Benchmark: fused multi-client LoRA linear, Pallas kernel vs the jnp twin (and base only).

Methods (one JSON line each, per pass):

* ``reference``: ``fused_lora_linear_reference`` (vmap of ``lora.apply``, XLA), the default.
* ``pallas``: ``fused_lora_linear`` (Triton on GPU; interpret mode elsewhere).
* ``base_only``: ``einsum(x, w)`` without LoRA: a lower bound, not a competitor.

Passes: ``fwd`` (``y``) and ``fwd_bwd`` (``value_and_grad`` w.r.t. ``x, a, b`` of a weighted
sum of ``y``; ``base_only`` takes the gradient w.r.t. ``x``). Compile time and run time (min
over ``--repeats`` of the compiled call with ``block_until_ready``) are separate; each summary
line gives ``speedup = reference_s / pallas_s`` and the max abs difference of the outputs.
On CPU the kernel runs in Pallas interpret mode: the timings only prove the script runs and
are MEANINGLESS (every line says ``timing_meaningful: false``).

Usage (the GPU command needs ``jax[cuda12]`` on an NVIDIA GPU, e.g. an H100)::

    python benchmarks/kernel_bench.py                  # auto: gpu preset on GPU, else cpu
    python benchmarks/kernel_bench.py --preset gpu --out benchmarks/results/kernel_h100.json
    python benchmarks/kernel_bench.py --preset gpu --sweep   # also time a grid of block configs
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import env_meta, time_jit

from fedlora_jax.kernels import lora_matmul as lm

PRESETS = {
    # RoBERTa-base attention projection, a chunk of 32 clients x (16 x 128) tokens.
    "gpu": dict(clients=32, tokens=16 * 128, n=768, m=768, rank=8, dtype="bfloat16",
                repeats=20),
    # Tiny, interpret mode: proves the script runs; timings meaningless.
    "cpu": dict(clients=2, tokens=32, n=64, m=64, rank=8, dtype="bfloat16", repeats=2),
}
SWEEP = dict(block_t=(64, 128), block_m=(64, 128), block_n=(32, 64), num_warps=(4, 8),
             num_stages=(3, 4))
SCALE = 2.0


def make_inputs(key, *, clients, tokens, n, m, rank, dtype):
    """``x [C,T,N]``, ``w [N,M]``, ``a [C,N,R]``, ``b [C,R,M]``, masks ``[C,R]`` (mixed ranks)."""
    kx, kw, ka, kb = jax.random.split(key, 4)
    x = jax.random.normal(kx, (clients, tokens, n), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (n, m), jnp.float32) / np.sqrt(n)).astype(dtype)
    a = (jax.random.normal(ka, (clients, n, rank), jnp.float32) / np.sqrt(n)).astype(dtype)
    b = (0.1 * jax.random.normal(kb, (clients, rank, m), jnp.float32)).astype(dtype)
    ranks = 1 + np.arange(clients) % rank
    mask = jnp.asarray(np.arange(rank)[None, :] < ranks[:, None], jnp.float32)
    return x, w, a, b, mask


def _methods(interpret: bool) -> dict:
    """name -> forward ``f(x, w, a, b, mask)``."""
    return {
        "reference": lambda x, w, a, b, m: lm.fused_lora_linear_reference(x, w, a, b, m,
                                                                           scale=SCALE),
        "pallas": lambda x, w, a, b, m: lm.fused_lora_linear(x, w, a, b, m, scale=SCALE,
                                                             interpret=interpret),
        "base_only": lambda x, w, a, b, m: jnp.einsum("ctn,nm->ctm", x, w),
    }


def _fwd_bwd(fwd, name: str):
    """``value_and_grad`` of a weighted sum of ``y`` w.r.t. ``x, a, b`` (``x`` for base_only)."""
    def loss(x, a, b, w, m):
        y = fwd(x, w, a, b, m).astype(jnp.float32)
        return jnp.sum(y * jnp.linspace(0.5, 1.5, y.shape[-1]))

    argnums = (0,) if name == "base_only" else (0, 1, 2)
    vg = jax.value_and_grad(loss, argnums=argnums)
    return lambda x, w, a, b, m: vg(x, a, b, w, m)


def _flops(cfg) -> dict:
    c, t, n, m, r = (cfg[k] for k in ("clients", "tokens", "n", "m", "rank"))
    fwd = 2 * c * t * (n * m + n * r + r * m)
    return {"fwd": fwd, "fwd_bwd": 3 * fwd}  # dx ~ fwd, da + db ~ low-rank; upper estimate


def _max_diff(u, v) -> float:
    leaves = zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)
    return max(float(jnp.max(jnp.abs(p.astype(jnp.float32) - q.astype(jnp.float32))))
               for p, q in leaves)


def bench(key, cfg: dict, *, interpret: bool, meaningful: bool, emit=print) -> list[dict]:
    dtype = jnp.dtype(cfg["dtype"])
    args = make_inputs(key, clients=cfg["clients"], tokens=cfg["tokens"], n=cfg["n"],
                       m=cfg["m"], rank=cfg["rank"], dtype=dtype)
    shape = dict(C=cfg["clients"], T=cfg["tokens"], N=cfg["n"], M=cfg["m"], R=cfg["rank"],
                 dtype=dtype.name, interpret=interpret, timing_meaningful=meaningful)
    blocks = lm.block_config(dtype, cfg["n"], cfg["m"], cfg["rank"], cfg["tokens"])
    flops = _flops(cfg)
    rows = []
    for pass_name in ("fwd", "fwd_bwd"):
        outs, times = {}, {}
        for name, fwd in _methods(interpret).items():
            fn = fwd if pass_name == "fwd" else _fwd_bwd(fwd, name)
            comp, run, outs[name] = time_jit(fn, args, cfg["repeats"])
            times[name] = run
            rows.append({"kind": "timing", "pass": pass_name, "method": name, **shape,
                         "compile_s": comp, "run_s": run, "repeats": cfg["repeats"],
                         "tflops": flops[pass_name] / run / 1e12,
                         **({"blocks": blocks._asdict()} if name == "pallas" else {})})
            emit(rows[-1])
        ref_out = outs["reference"] if pass_name == "fwd" else outs["reference"][1]
        pal_out = outs["pallas"] if pass_name == "fwd" else outs["pallas"][1]
        rows.append({"kind": "summary", "pass": pass_name, **shape,
                     "speedup_vs_reference": times["reference"] / times["pallas"],
                     "lora_overhead_reference": times["reference"] / times["base_only"],
                     "lora_overhead_pallas": times["pallas"] / times["base_only"],
                     "max_abs_diff": _max_diff(pal_out, ref_out)})
        emit(rows[-1])
    return rows


def sweep(key, cfg: dict, *, interpret: bool, meaningful: bool, emit=print) -> list[dict]:
    """Forward time of the kernel for every config in :data:`SWEEP` (fills the frozen table)."""
    dtype = jnp.dtype(cfg["dtype"])
    args = make_inputs(key, clients=cfg["clients"], tokens=cfg["tokens"], n=cfg["n"],
                       m=cfg["m"], rank=cfg["rank"], dtype=dtype)
    table_key = (dtype.name, cfg["n"], cfg["m"], cfg["rank"])
    saved = lm.BLOCK_CONFIGS.get(table_key)
    rows = []
    try:
        for bt, bm, bn, nw, ns in itertools.product(*SWEEP.values()):
            if cfg["tokens"] % bt or cfg["m"] % bm or cfg["n"] % bn:
                continue
            lm.BLOCK_CONFIGS[table_key] = lm.BlockConfig(bt, bm, bn, nw, ns)
            fn = lambda x, w, a, b, m: lm.fused_lora_linear(x, w, a, b, m, scale=SCALE,
                                                            interpret=interpret)
            try:
                _, run, _ = time_jit(fn, args, cfg["repeats"])
                row = {"run_s": run, "error": None}
            except Exception as e:  # a config Triton cannot compile is reported, not fatal
                row = {"run_s": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append({"kind": "sweep", "pass": "fwd", "block_t": bt, "block_m": bm,
                         "block_n": bn, "num_warps": nw, "num_stages": ns,
                         "timing_meaningful": meaningful, **row})
            emit(rows[-1])
    finally:
        if saved is None:
            lm.BLOCK_CONFIGS.pop(table_key, None)
        else:
            lm.BLOCK_CONFIGS[table_key] = saved
    ok = [r for r in rows if r["run_s"] is not None]
    if ok:
        best = min(ok, key=lambda r: r["run_s"])
        rows.append({**best, "kind": "sweep_best"})
        emit(rows[-1])
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["auto", *sorted(PRESETS)], default="auto")
    for name in ("clients", "tokens", "n", "m", "rank", "repeats"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="also time a grid of block configs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write all JSON records to this file (JSON list)")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    preset = args.preset if args.preset != "auto" else ("gpu" if on_gpu else "cpu")
    cfg = dict(PRESETS[preset])
    for name in ("clients", "tokens", "n", "m", "rank", "repeats", "dtype"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    interpret = not on_gpu
    meaningful = on_gpu
    records = [{**env_meta(), "preset": preset, "config": cfg, "interpret": interpret,
                "timing_meaningful": meaningful,
                **({} if meaningful else {"note": "interpret mode on CPU: timings only prove "
                                                  "the script runs and are meaningless"})}]
    print(json.dumps(records[0]), flush=True)
    key = jax.random.key(args.seed)

    def emit(row):
        records.append(row)
        print(json.dumps(row), flush=True)

    bench(key, cfg, interpret=interpret, meaningful=meaningful, emit=emit)
    if args.sweep:
        sweep(key, cfg, interpret=interpret, meaningful=meaningful, emit=emit)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
