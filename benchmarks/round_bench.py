"""Benchmark one federated round: ours (one jit, chunked vmap) vs the peer (torch + peft, sequential).

Usage (CPU, the issue's workload)::

    python benchmarks/round_bench.py --size minilm --clients 8 --steps 5 --batch 8 --seq 64 --rank 8 --dtype f32 --peer

GPU (RoBERTa-base size; one command, run on a machine with jax[cuda] + torch)::

    python benchmarks/round_bench.py --preset gpu --peer

Our model classifies from the first token by default (``--pooling cls``), as the peer's
``RobertaForSequenceClassification`` does; our encoder then evaluates its last block at that token
only (``EncoderConfig.cls_shortcut``: same logits and gradients, fewer FLOPs). ``--pooling mean``
needs every token of every block. ``--norm-barrier`` / ``--merged-lora`` (``auto | on | off``) set the
model config's CPU speed-up switches; each row records the values they resolved to.

Prints one JSON line per configuration (ours, and the peer when ``--peer``), with client-steps/s,
tokens/s, compile time, the model FLOP rate and its fraction of a measured matmul peak.

FLOP count (written here, used for utilisation; "model FLOPs" of LoRA training with a frozen base):
per token and per layer, forward ``2 W`` (W = 4 H^2 + 2 H F frozen matmul weights) plus attention
``4 T H`` (scores and weighted values), plus the LoRA path ``2 r (N + M)`` per adapted module;
backward only as far as gradients are needed: activation gradients through the frozen weights
``2 W + 8 T H`` per layer above the lowest adapted layer (all layers here) and LoRA weight +
activation gradients ``4 r (N + M)``. No weight-gradient FLOPs for the frozen base. The peer's
script uses ``4 N_base`` per token (forward + input-grad, attention ignored); we report both.
With first-token pooling (``cls``/``pooler``) only the first position's output of the last layer is
needed: that layer counts its key/value projections (and the value LoRA) for all ``T`` tokens and
everything else (query, attention, output projection, FFN, query LoRA) for one token, forward and
backward; so utilisation is never credited for work the loss does not need.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bench_common import cpu_model
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.aggregation import fedit
from fedlora_jax.driver.tasks import classification_task
from fedlora_jax.federated import cpu_cache_chunk_cap, init_server_state, make_round, make_spec
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=1000),
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, vocab_size=30522),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=50265),
}


def model_flops_per_token(h, f, layers, t, r, n_mod):
    w = 4 * h * h + 2 * h * f
    lora = n_mod * r * (h + h)
    fwd = layers * (2 * w + 4 * t * h + 2 * lora)
    bwd = layers * (2 * w + 8 * t * h + 4 * lora)
    return fwd + bwd


def model_flops_per_sequence(h, f, layers, t, r, first_token_only: bool):
    """Model FLOPs of one length-``t`` sequence, LoRA on query and value (see the module
    docstring); ``first_token_only``: the last layer's output is needed at position 0 only."""
    if not first_token_only:
        return model_flops_per_token(h, f, layers, t, r, 2) * t
    lora_one = r * (h + h)                                     # one module, one token, forward
    kv = t * (2 + 2) * (2 * h * h) + t * (2 + 4) * lora_one    # K, V projections + value LoRA
    q_side = (2 + 2) * (2 * h * h + 2 * h * f) + (4 + 8) * t * h + (2 + 4) * lora_one
    return model_flops_per_token(h, f, layers - 1, t, r, 2) * t + kv + q_side


def peer_flops_per_token(h, f, layers):
    return 4 * layers * (4 * h * h + 2 * h * f)


def measure_matmul_peak(dtype, n=2048, reps=5):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def run_ours(a, C):
    size = SIZES[a.size]
    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float32
    cfg = EncoderConfig(model_type="bert", max_position_embeddings=max(512, a.seq), num_labels=20,
                        pooling=a.pooling, dtype=dtype, param_dtype=dtype, norm_barrier=a.norm_barrier,
                        merged_lora=a.merged_lora, **size)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    graphdef, base, head = split_for_round(model)
    targets = model.adapter_targets(["query", "value"])
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    glob = lora_lib.init(jax.random.key(1), shapes, a.rank)
    agg = fedit()
    task = classification_task(graphdef, scale=2.0, remat=a.remat)
    if a.chunk is None and jax.default_backend() == "cpu":
        chunk = cpu_cache_chunk_cap(a.batch, a.seq, max(size["hidden_size"], size["intermediate_size"]),
                                    itemsize=2 if a.dtype == "bf16" else 4)
    else:
        chunk = a.chunk or C
    rf = make_round(task, agg, optimizer=optax.adamw(1e-4), chunk_size=min(chunk, C),
                    static_grad_cut=a.static_cut)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, size["vocab_size"], (C, a.steps, a.batch, a.seq)).astype(np.int32),
             "attention_mask": np.ones((C, a.steps, a.batch, a.seq), np.int32),
             "labels": rng.integers(0, 20, (C, a.steps, a.batch)).astype(np.int32),
             "example_mask": np.ones((C, a.steps, a.batch), np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)
    masks = {k: np.ones((C, a.rank), np.float32) for k in shapes}
    spec = make_spec(masks, num_steps=np.full(C, a.steps), weight=np.ones(C), client_id=np.arange(C),
                     num_layers=cfg.num_layers)
    spec = jax.tree.map(jnp.asarray, spec)
    state = init_server_state(glob, head, agg)
    t0 = time.perf_counter()
    compiled = rf.jitted.lower(state, batch, spec, jax.random.key(0), base).compile()
    compile_s = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    xla_flops = (ca[0] if isinstance(ca, list) else ca or {}).get("flops")
    times = []
    for r in range(a.rounds):
        t = time.perf_counter()
        state, m = compiled(state, batch, spec, jax.random.key(r), base)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    best = min(times)
    tokens = C * a.steps * a.batch * a.seq
    h, f, L = size["hidden_size"], size["intermediate_size"], size["num_layers"]
    mflops = model_flops_per_sequence(h, f, L, a.seq, a.rank, a.pooling != "mean") * C * a.steps * a.batch
    try:
        mem = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not report
        mem = {}
    return dict(system="fedlora_jax (one jit, chunked vmap)", device=str(jax.devices()[0].device_kind),
                jax=jax.__version__, size=a.size, pooling=a.pooling, clients=C, chunk=min(chunk, C),
                steps=a.steps, batch=a.batch,
                seq=a.seq, rank=a.rank, dtype=a.dtype, remat=a.remat, static_cut=a.static_cut,
                norm_barrier=model.config.norm_barrier, merged_lora=model.config.merged_lora,
                compile_s=round(compile_s, 2),
                round_s=round(best, 4), round_times=[round(x, 4) for x in times],
                client_steps_per_s=round(C * a.steps / best, 2), tokens_per_s=round(tokens / best),
                model_tflops=round(mflops / best / 1e12, 4),
                peer_formula_tflops=round(peer_flops_per_token(h, f, L) * tokens / best / 1e12, 4),
                peak_bytes=mem.get("peak_bytes_in_use"), process_peak_rss_mb=peak_rss_mb(),
                traces=rf.trace_count(), xla_flops=xla_flops)


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) of this process so far; monotone over a run (the rows of
    larger C come later). On CPU this is the only peak-memory figure (``memory_stats()`` is
    None there)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)   # Linux: KiB


def run_with_peak_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run ``cmd``; also return its peak RSS in MiB, read from ``/proc/<pid>/status`` (VmHWM,
    which restarts at ``exec``) while it runs, or ``None`` where ``/proc`` is unavailable.
    (``RUSAGE_CHILDREN`` is no good here: it counts the forked copy of this process.)"""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        hwm = None
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm or 0.0, int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done, None if hwm is None else round(hwm, 1)


def run_peer(a, C):
    peer = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "peer_torch_peft.py"
    if not peer.is_file():
        peer = Path(os.environ.get("FEDLORA_PEER", "../shared/bench/peer_torch_peft.py"))
    cmd = [sys.executable, str(peer), "--size", a.size, "--clients", str(C), "--steps", str(a.steps),
           "--batch", str(a.batch), "--seq", str(a.seq), "--rank", str(a.rank), "--rounds", str(a.rounds),
           "--dtype", "bf16" if a.dtype == "bf16" else "f32"]
    out, rss = run_with_peak_rss(cmd)
    if out.returncode != 0:
        return {"system": "torch+peft sequential", "error": out.stderr[-2000:]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["peer_process_peak_rss_mb"] = rss
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None)
    p.add_argument("--size", default="minilm", choices=list(SIZES))
    p.add_argument("--clients", type=int, nargs="+", default=[8])
    p.add_argument("--chunk", type=int, default=None,
                   help="clients per vmap chunk (0 = all; default: federated.cpu_cache_chunk_cap on CPU, "
                        "all clients elsewhere)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--pooling", default="cls", choices=["cls", "mean", "pooler"],
                   help="our classifier's pooling: cls (default) reads the first token, as the peer's "
                        "RobertaForSequenceClassification does (with EncoderConfig.cls_shortcut the last "
                        "block runs at that token only); mean is MiniLM's sentence pooling (every token)")
    p.add_argument("--remat", action="store_true", help="jax.checkpoint each transformer block")
    p.add_argument("--norm-barrier", choices=["auto", "on", "off"], default="auto",
                   help="EncoderConfig.norm_barrier (LayerNorm gradient barrier; auto = on for CPU)")
    p.add_argument("--merged-lora", choices=["auto", "on", "off"], default="auto",
                   help="EncoderConfig.merged_lora (float32 LoRA folded into the kernel; auto = on for CPU)")
    p.add_argument("--static-cut", type=int, default=None,
                   help="no backward below this layer, compiled statically (FedARA module pruning)")
    p.add_argument("--peer", action="store_true", help="also run ../shared/bench/peer_torch_peft.py")
    p.add_argument("--out", help="append JSON lines to this file")
    a = p.parse_args()
    if a.preset == "gpu":
        a.size, a.steps, a.batch, a.seq, a.rank, a.dtype = "base", 10, 16, 128, 8, "bf16"
        if a.clients == [8]:
            a.clients = [8, 32, 64, 128, 256]
        a.chunk = a.chunk or 32
    peak = measure_matmul_peak(jnp.bfloat16 if a.dtype == "bf16" else jnp.float32)
    header = dict(kind="env", date=time.strftime("%Y-%m-%d"), jax=jax.__version__, platform=platform.platform(),
                  cpu=cpu_model(), cores=os.cpu_count(), device=str(jax.devices()[0]),
                  matmul_peak_tflops=round(peak / 1e12, 4))
    lines = [header]
    print(json.dumps(header), flush=True)
    for C in a.clients:
        ours = run_ours(a, C)
        ours["mfu_vs_matmul_peak"] = round(ours["model_tflops"] * 1e12 / peak, 4)
        lines.append(ours)
        print(json.dumps(ours), flush=True)
        if a.peer:
            peer = run_peer(a, C)
            if "client_steps_per_s" in peer:
                peer["ours_speedup"] = round(ours["client_steps_per_s"] / peer["client_steps_per_s"], 2)
            lines.append(peer)
            print(json.dumps(peer), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")


if __name__ == "__main__":
    main()
