"""Benchmark a federated round with LEGEND-style heterogeneous LoRA depths (issue 22).

Workload: MiniLM shape (BERT, hidden 384, 6 layers, 12 heads, FFN 1536, random weights),
classification, LoRA on query/value with ``r_max`` 8, FedIT (zero-padding FedAvg). Client
``c`` gets depth ``depths[c % len(depths)]`` (default 6 3 1: the device mix AGX Orin / Orin
Nano / Raspberry Pi 5): adapters only on its top ``d`` layers, per-layer ranks from
:func:`fedlora_jax.algorithms.legend_planner.rank_ramp` (rising toward the output, budget
``--budget-per-layer * d``, ``r_min`` .. ``r_max``).

Three systems, measured in one invocation and alternating round by round (after one
untimed warm-up round each):

(a) ours, ``make_round`` as today: the dynamic per-client gradient cut (zero gradients below
    the depth, but the vmapped backward still runs through every layer);
(b) ours with ``cut_variants`` = the mix's cuts ``L - d``: clients ordered by depth, each
    chunk runs a static variant without the backward below its cut;
(c) the depth-aware peer ``benchmarks/peer_depth_peft.py`` (torch + peft, clients one after
    another, adapters and ``requires_grad`` only on each client's layers), in its own process
    (``--serve``: one round per request, so its rounds alternate with ours).

(a) and (b) start each timed round from the same state with the same data, spec and key; the
row ``kind: "summary"`` says whether their new global adapters and heads are bit for bit
equal (``np.array_equal``), client-steps/s of each, ours / peer, compile times, XLA temp
memory per program, this process's and the peer's peak RSS, and the 1/5/15-minute load
average before / after each measurement. ``--sweep-depths`` runs the mixes (6 6 6), (6 3 1),
(3 3 1), (1 1 1) and prints round time against the mix's mean depth.

Usage (the issue's CPU measurement; see benchmarks/README.md)::

    python benchmarks/depth_bench.py --clients 8 32 --steps 5 --batch 8 --seq 64 --repeats 3

Tiny smoke run::

    python benchmarks/depth_bench.py --size tiny --clients 4 --steps 1 --batch 2 --seq 16 --repeats 1 --out /tmp/x.jsonl
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bench_common import cpu_model
from flax import nnx
from round_bench import SIZES, load_average, peak_rss_mb, torch_versions

from fedlora_jax import lora as lora_lib
from fedlora_jax.aggregation import fedit
from fedlora_jax.algorithms.legend_planner import rank_ramp
from fedlora_jax.driver.tasks import classification_task
from fedlora_jax.federated import cpu_cache_chunk_cap, init_server_state, make_round, make_spec
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round

HERE = Path(__file__).resolve().parent
MODULES = ("query", "value")
DEVICE_MIX = ("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "raspberry_pi_5_8gb")   # default depths 6 3 1
SWEEP = ((6, 6, 6), (6, 3, 1), (3, 3, 1), (1, 1, 1))
SYSTEMS = ("dynamic", "variants", "peer")


def client_plan(depths, C: int, L: int, r_min: int, r_max: int, budget_per_layer: int) -> list[list[int]]:
    """Per-client per-layer ranks ``[C][L]``: depth ``depths[c % len]`` round-robin, ranks from
    ``rank_ramp`` (top ``d`` layers, non-decreasing toward the output)."""
    out = []
    for c in range(C):
        d = int(depths[c % len(depths)])
        out.append([int(r) for r in rank_ramp(L, d, budget_per_layer * d, r_min, r_max)])
    return out


def cuts_of(plan) -> tuple[int, ...]:
    """The mix's gradient cuts: the lowest adapted layer of each client configuration."""
    return tuple(sorted({min(i for i, r in enumerate(p) if r) for p in plan}))


def stats(x) -> dict:
    return dict(round_s=round(min(x), 4), round_s_median=round(float(np.median(x)), 4),
                round_times=[round(t, 4) for t in x])


class Ours:
    """The model, data and spec of one (C, mix); builds and compiles rounds for it."""

    def __init__(self, a, C: int, plan):
        size = SIZES[a.size]
        self.cfg = EncoderConfig(model_type="bert", max_position_embeddings=max(512, a.seq), num_labels=20,
                                 pooling="cls", dtype=jnp.float32, param_dtype=jnp.float32, **size)
        model = EncoderClassifier(self.cfg, rngs=nnx.Rngs(0))
        self.norm_barrier, self.merged_lora = model.config.norm_barrier, model.config.merged_lora
        graphdef, self.base, head = split_for_round(model)
        targets = model.adapter_targets(list(MODULES))
        shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
        glob = lora_lib.init(jax.random.key(1), shapes, a.rmax)
        self.task = classification_task(graphdef, scale=2.0)
        if a.chunk is None and jax.default_backend() == "cpu":
            chunk = cpu_cache_chunk_cap(a.batch, a.seq, max(size["hidden_size"], size["intermediate_size"]))
        else:
            chunk = a.chunk or C
        self.chunk = min(chunk, C)
        rng = np.random.default_rng(0)
        batch = {"input_ids": rng.integers(3, size["vocab_size"], (C, a.steps, a.batch, a.seq)).astype(np.int32),
                 "attention_mask": np.ones((C, a.steps, a.batch, a.seq), np.int32),
                 "labels": rng.integers(0, 20, (C, a.steps, a.batch)).astype(np.int32),
                 "example_mask": np.ones((C, a.steps, a.batch), np.float32)}
        self.batch = jax.tree.map(jnp.asarray, batch)
        ranks = np.asarray(plan)                                                  # [C, L]
        masks = {k: (np.arange(a.rmax)[None, :] < ranks[:, t.layer][:, None]).astype(np.float32)
                 for k, t in targets.items()}
        spec = make_spec(masks, num_steps=np.full(C, a.steps), weight=np.ones(C), client_id=np.arange(C),
                         num_layers=self.cfg.num_layers, layer_of_key={k: t.layer for k, t in targets.items()})
        self.grad_cut = np.asarray(spec.grad_cut).tolist()
        self.spec = jax.tree.map(jnp.asarray, spec)
        self.state = init_server_state(glob, head, fedit())

    def compile(self, cut_variants):
        rf = make_round(self.task, fedit(), optimizer=optax.adamw(1e-4), chunk_size=self.chunk,
                        cut_variants=cut_variants)
        args = (self.state, self.batch, self.spec, jax.random.key(0), self.base)
        t0 = time.perf_counter()
        compiled = rf.jitted.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        info = dict(compile_s=round(compile_s, 2))
        try:
            ca = compiled.cost_analysis()
            info["xla_flops"] = (ca[0] if isinstance(ca, list) else ca or {}).get("flops")
        except Exception:  # noqa: BLE001 - optional diagnostics
            pass
        try:
            ma = compiled.memory_analysis()
            info["xla_temp_mb"] = round(ma.temp_size_in_bytes / 2**20, 1)
        except Exception:  # noqa: BLE001
            pass
        run = lambda: jax.block_until_ready(compiled(*args))
        run()                                                                      # warm-up
        info["traces"] = rf.trace_count()
        return run, info


class Peer:
    """``peer_depth_peft.py --serve`` in its own process: one round per :meth:`round`."""

    def __init__(self, a, C: int, plan):
        cmd = [sys.executable, str(HERE / "peer_depth_peft.py"), "--serve", "--size", a.size, "--clients", str(C),
               "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq), "--rmax", str(a.rmax),
               "--plan", json.dumps(plan), "--threads", str(a.peer_threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.ready = self._read()
        self.round()                                                               # warm-up

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("peer_depth_peft.py died:\n" + self.proc.stderr.read()[-3000:])
        return json.loads(line)

    def round(self) -> float:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._read()["round_s"]

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(timeout=60)
        return out


def timed(fn):
    before = load_average()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, before, load_average()


def bench_one(a, C: int, depths, header: dict, emit) -> dict:
    size = SIZES[a.size]
    L = size["num_layers"]
    plan = client_plan(depths, C, L, a.rmin, a.rmax, a.budget_per_layer)
    variants = tuple(c for c in cuts_of(plan) if c > 0)
    real_depths = [sum(1 for r in p if r) for p in plan]
    common = dict(size=a.size, clients=C, steps=a.steps, batch=a.batch, seq=a.seq, r_min=a.rmin, r_max=a.rmax,
                  budget_per_layer=a.budget_per_layer, depth_mix=list(depths), client_depths=real_depths,
                  mean_depth=round(float(np.mean(real_depths)), 3), layer_ranks=plan, modules=list(MODULES),
                  aggregator="fedit (zero-padding FedAvg)", optimizer="adamw(1e-4)", dtype="f32", pooling="cls",
                  **{k: header[k] for k in ("date", "cpu", "cores", "platform", "python", "jax", "torch",
                                            "transformers", "peft")})
    if list(depths) == [6, 3, 1] and L == 6:
        common["device_mix"] = list(DEVICE_MIX)
    ours = Ours(a, C, plan)
    common.update(chunk=ours.chunk, grad_cut=ours.grad_cut, norm_barrier=ours.norm_barrier,
                  merged_lora=ours.merged_lora)
    runs, infos, times, loads, results = {}, {}, {s: [] for s in SYSTEMS}, {s: [] for s in SYSTEMS}, {}
    for name, cv in (("dynamic", None), ("variants", variants)):
        runs[name], infos[name] = ours.compile(cv)
        infos[name]["cut_variants"] = None if cv is None else [0, *cv]
        infos[name]["process_peak_rss_mb_after_compile"] = peak_rss_mb()
    peer = None if a.no_peer else Peer(a, C, plan)
    for _ in range(a.repeats):                      # alternate: (a), (b), peer, (a), (b), peer, ...
        for name in SYSTEMS:
            if name == "peer":
                if peer is None:
                    continue
                wall, dt, lb, la = timed(peer.round)
            else:
                dt, out, lb, la = timed(runs[name])
                results[name] = out
            times[name].append(dt)
            loads[name].append(dict(before=lb, after=la))
    rows = []
    for name in ("dynamic", "variants"):
        row = dict(kind="ours", system=f"fedlora_jax ({'dynamic cut' if name == 'dynamic' else 'cut_variants'})",
                   mode=name, **common, **infos[name], **stats(times[name]),
                   client_steps_per_s=round(C * a.steps / min(times[name]), 3), load_avg=loads[name],
                   process_peak_rss_mb=peak_rss_mb())
        rows.append(row)
    if peer is not None:
        ps = peer.close()
        rows.append(dict(kind="peer", system=ps["system"], mode="peer", **common, **stats(times["peer"]),
                         client_steps_per_s=round(C * a.steps / min(times["peer"]), 3), load_avg=loads["peer"],
                         peer_setup_s=ps.get("setup_s"), peer_trainable_params=ps.get("trainable_params"),
                         peer_threads=ps.get("threads"), peer_process_peak_rss_mb=ps.get("peer_process_peak_rss_mb")))
    (s_dyn, _), (s_var, _) = results["dynamic"], results["variants"]
    equal = all(np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(jax.tree.leaves((s_dyn.lora, s_dyn.head)), jax.tree.leaves((s_var.lora, s_var.head)),
                                strict=True))
    by = {r["mode"]: r for r in rows}
    summ = dict(kind="summary", **{k: common[k] for k in ("size", "clients", "steps", "batch", "seq", "depth_mix",
                                                           "mean_depth", "chunk", "date")},
                cut_variants=infos["variants"]["cut_variants"], variants_equal_dynamic_bit_for_bit=bool(equal),
                **{f"{m}_client_steps_per_s": by[m]["client_steps_per_s"] for m in by},
                **{f"{m}_round_s": by[m]["round_s"] for m in by},
                variants_over_dynamic=round(by["dynamic"]["round_s"] / by["variants"]["round_s"], 3),
                compile_s={m: infos[m]["compile_s"] for m in ("dynamic", "variants")},
                xla_temp_mb={m: infos[m].get("xla_temp_mb") for m in ("dynamic", "variants")},
                process_peak_rss_mb=peak_rss_mb())
    if "peer" in by:
        summ.update(dynamic_over_peer=round(by["dynamic"]["client_steps_per_s"] / by["peer"]["client_steps_per_s"], 3),
                    variants_over_peer=round(by["variants"]["client_steps_per_s"] / by["peer"]["client_steps_per_s"],
                                             3),
                    peer_process_peak_rss_mb=by["peer"]["peer_process_peak_rss_mb"])
    for r in rows + [summ]:
        emit(r)
    return summ


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rmax", type=int, default=8)
    p.add_argument("--rmin", type=int, default=1)
    p.add_argument("--budget-per-layer", type=int, default=6,
                   help="rank budget per adapted layer of rank_ramp (depth d: budget = this * d)")
    p.add_argument("--depths", type=int, nargs="+", default=[6, 3, 1],
                   help="depth mix, round-robin over the clients (adapters on the top d layers)")
    p.add_argument("--uniform", action="store_true", help="every client at full depth (L)")
    p.add_argument("--sweep-depths", action="store_true",
                   help="run the mixes (6 6 6), (6 3 1), (3 3 1), (1 1 1) (scaled to L) and print time vs mean depth")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per system (alternating), best reported")
    p.add_argument("--chunk", type=int, default=None,
                   help="clients per vmap chunk (0 = all; default federated.cpu_cache_chunk_cap on CPU)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-threads", type=int, default=0,
                   help="torch.set_num_threads of the peer (0 = torch's default, as round_bench's peer)")
    p.add_argument("--out", default=str(HERE / "results" / "depth_cpu.jsonl"), help="append JSON lines here")
    a = p.parse_args()
    L = SIZES[a.size]["num_layers"]
    scale = lambda mix: [max(1, min(L, round(d * L / 6))) for d in mix]
    if a.sweep_depths:
        mixes = [scale(m) for m in SWEEP]
    elif a.uniform:
        mixes = [[L]]
    else:
        if any(not 1 <= d <= L for d in a.depths):
            p.error(f"--depths must lie in [1, {L}]")
        mixes = [list(a.depths)]
    header = dict(kind="env", date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cpu=cpu_model(), cores=os.cpu_count(),
                  platform=platform.platform(), python=platform.python_version(), jax=jax.__version__,
                  backend=jax.default_backend(), device=str(jax.devices()[0]), load_avg=load_average(),
                  argv=sys.argv[1:], **torch_versions())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(a.out, "a")

    def emit(row):
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    emit(header)
    summaries = []
    try:
        for mix in mixes:
            for C in a.clients:
                summaries.append(bench_one(a, C, mix, header, emit))
    finally:
        out.close()
    print("\n| C | mix | mean depth | (a) dynamic s | (b) cut_variants s | peer s | (b)/(a) speed-up | "
          "(b)/peer | (b) == (a) |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for s in sorted(summaries, key=lambda s: (s["clients"], -s["mean_depth"])):
        print(f"| {s['clients']} | {' '.join(map(str, s['depth_mix']))} | {s['mean_depth']} | {s['dynamic_round_s']} "
              f"| {s['variants_round_s']} | {s.get('peer_round_s', '-')} | {s['variants_over_dynamic']}x | "
              f"{str(s['variants_over_peer']) + 'x' if 'variants_over_peer' in s else '-'} | "
              f"{s['variants_equal_dynamic_bit_for_bit']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
