"""Compiled federated rounds for TPU slices, planned on this CPU host (``fedlora_jax.plan``).

Every row is one ``plan_round``: the round built from an ``ExperimentConfig`` whose model is a
shape preset (``shape:smollm2-135m``, ``shape:llama-3.2-1b``, ``shape:llama-3-8b``: the public
dimensions, no weights), compiled by XLA:TPU (libtpu) for the topology. Per chip: HBM bytes
and the fit verdict (from the compiler), FLOPs and collective bytes (read from the compiled
program, loop trip counts included), an ESTIMATED round time (roofline from public peaks, not a
measurement). Compile seconds are wall-clock seconds on this host.

Usage (rows are appended to the JSONL as they finish; rows already there are skipped)::

    python benchmarks/tpu_plan.py --rows smoke              # a seconds-long check
    python benchmarks/tpu_plan.py --rows all --out benchmarks/results/tpu_plan.jsonl
    python benchmarks/tpu_plan.py --table benchmarks/results/tpu_plan.jsonl   # print the markdown table

Sets of rows (``--rows``): ``smoke``; ``weak`` (fixed clients per chip, growing v5e slices);
``strong`` (fixed slice, growing C); ``big`` (Llama-3-8B on v5e with a model axis and on v5p;
Llama-3.2-1B); ``weak-model`` (weak scaling with a model axis); ``nofit`` (Llama-3-8B replicated on
v5e: refused);
``sharding`` (Megatron vs FSDP placement of the base on a model axis); ``gens`` (v5p / v6e); ``all``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.plan import format_plan, plan_round

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def config(shape: str, clients: int, *, steps=2, batch=4, seq=256, chunk=None, ranks=(4, 8, 16), remat=False,
           dtype="bfloat16") -> ExperimentConfig:
    """FedIT, heterogeneous ranks round-robin (r_max = max), LoRA on q/k/v/o of every layer."""
    return ExperimentConfig(
        name=f"{shape}-C{clients}", model=f"shape:{shape}", task="causal_lm", dataset="shakespeare",
        partition="natural", max_length=seq, num_clients=max(clients, 2), clients_per_round=clients,
        local_steps=steps, batch_size=batch, r_max=max(ranks), lora_alpha=2.0 * max(ranks), target_modules=MODULES,
        client_ranks=tuple(ranks), algorithm="fedit", chunk_size=chunk or clients, lr=1e-4, dtype=dtype, remat=remat)


def chips_of(topology: str) -> int:
    n = 1
    for d in topology.split(":")[1].split("x"):
        n *= int(d)
    return n


# (label, shape, topology, mesh, C, config kwargs)
def rows(which: str) -> list:
    out = []
    if which in ("smoke",):
        out.append(("smoke", "llama-tiny", "v5e:2x2", None, 8, dict(seq=32, batch=2)))
    if which in ("weak", "all"):
        # 2 clients per chip, SmolLM2-135M, 2 x 4 x 256 tokens per client, one client per chip at a time
        for topo in ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5e:16x16"):
            n = chips_of(topo)
            out.append(("weak", "smollm2-135m", topo, None, 2 * n, dict(chunk=n)))
    if which in ("strong", "all"):
        for c in (8, 64, 256, 1024):
            out.append(("strong", "smollm2-135m", "v5e:4x4", None, max(c, 16), dict(chunk=16)))
    if which in ("weak4", "all"):
        # 4 clients per chip: up to C = 1,024 clients per round on a v5e:16x16 (256 chips)
        for topo in ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5e:16x16"):
            n = chips_of(topo)
            out.append(("weak4", "smollm2-135m", topo, None, 4 * n, dict(chunk=n)))
    if which in ("strong-2x2", "all"):
        # the smallest slice held fixed from C = 8 (2 clients per chip) to 1,024 (256 per chip)
        for c in (8, 64, 1024):
            out.append(("strong-2x2", "smollm2-135m", "v5e:2x2", None, c, dict(chunk=4)))
    if which in ("big", "all"):
        out.append(("big", "llama-3-8b", "v5e:4x4", "clients=4,model=4", 64, dict(seq=512, chunk=4)))
        out.append(("big", "llama-3-8b", "v5p:2x2x1", None, 64, dict(seq=512, chunk=4)))
        out.append(("big", "llama-3.2-1b", "v5e:4x4", None, 16, dict(seq=512, chunk=16)))
    if which in ("big-weak", "all"):
        # Llama-3-8B at 1,024 clients per round: the big v5e row's 16 clients per clients-group, 16 -> 256 chips
        out.append(("big-weak", "llama-3-8b", "v5e:16x16", "clients=64,model=4", 1024, dict(seq=512, chunk=64)))
    if which in ("weak-model", "all"):
        # weak scaling with the base on a model axis of 2: 2 clients per clients-group, 2x2 -> 4x4
        for topo, nc in (("v5e:2x2", 2), ("v5e:4x4", 8)):
            out.append(("weak-model", "llama-3.2-1b", topo, f"clients={nc},model=2", 2 * nc,
                        dict(steps=1, batch=2, seq=512, chunk=nc)))
    if which in ("nofit", "all"):
        # the 16 GB bf16 base replicated on 16 GB v5e chips: the compiler refuses
        out.append(("nofit", "llama-3-8b", "v5e:2x2", None, 8, dict(seq=512, chunk=4)))
    if which in ("sharding", "all"):
        # the frozen base on a model axis: Megatron (column/row-parallel; explicit shard_maps, or the
        # same placement partitioned by XLA) vs FSDP (gathered where used)
        for mode in ("megatron", "megatron-spmd", "fsdp"):
            out.append(("sharding", "llama-3.2-1b", "v5e:2x2", "clients=2,model=2", 4,
                        dict(steps=1, batch=2, seq=512, chunk=2, base_sharding=mode)))
    if which in ("gens", "all"):
        out.append(("gens", "smollm2-135m", "v5p:2x2x1", None, 8, dict(chunk=4)))
        out.append(("gens", "smollm2-135m", "v6e:2x2", None, 8, dict(chunk=4)))
    return out


def key_of(label, shape, topo, mesh, c, kw) -> str:
    return json.dumps([label, shape, topo, mesh, c, sorted(kw.items())])


def run(which: str, out: Path, base_sharding: str) -> None:
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line).get("row_key"))
    for label, shape, topo, mesh, c, kw in rows(which):
        if base_sharding != "megatron" and mesh and "model" in mesh:   # --base-sharding: a different row
            kw = {"base_sharding": base_sharding, **kw}
        k = key_of(label, shape, topo, mesh, c, kw)
        if k in done:
            print(f"skip (done): {k}", file=sys.stderr)
            continue
        t0 = time.time()
        kw = dict(kw)
        mode = kw.pop("base_sharding", base_sharding)
        row = plan_round(config(shape, c, **kw), topo, mesh=mesh, base_sharding=mode, progress=sys.stderr,
                         progress_every=30)
        row.update(row_key=k, set=label, shape=shape, wall_s=round(time.time() - t0, 1))
        print(format_plan(row), file=sys.stderr, flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.2f}"


def table(path: Path) -> str:
    head = ("| set | model | slice | mesh | C | C/chip | S x B x T | compile s | HBM/chip GB (cap) | fits | "
            "TFLOP/chip | FLOP ratio | collective MB/chip | est. round ms | est. client-steps/s | coll. share |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        if "model" in r["mesh"]:
            mesh += f" ({r['base_sharding']})"
        sbt = f"{r['steps']}x{r['batch']}x{r['seq']}"
        if "error" in r or not r.get("fits"):
            why = r.get("error", "over HBM")[:120]
            lines.append(f"| {r['set']} | {r['shape']} | {r['topology']} | {mesh} | {r['clients']} | "
                         f"{r['clients_per_chip']:g} | {sbt} | {r['compile_s']:.0f} | does not fit: {why} | no | "
                         "| | | | | |")
            continue
        e = r["estimate"]
        lines.append(
            f"| {r['set']} | {r['shape']} | {r['topology']} | {mesh} | {r['clients']} | {r['clients_per_chip']:g} | "
            f"{sbt} | {r['compile_s']:.0f} | {_gb(r['total_bytes'])} ({_gb(r['hbm_capacity_bytes'])}) | yes | "
            f"{r['flops_per_chip'] / 1e12:.2f} | {r['flops_ratio']:.3f} | {r['collective_bytes_per_chip'] / 1e6:.1f} | "
            f"{e['round_s'] * 1e3:.1f} | {e['client_steps_per_s']:.0f} | {e['collective_share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="smoke",
                   choices=("smoke", "weak", "weak4", "strong", "strong-2x2", "big", "big-weak", "weak-model", "nofit",
                            "sharding", "gens", "all"))
    p.add_argument("--out", default="benchmarks/results/tpu_plan.jsonl")
    p.add_argument("--base-sharding", default="megatron")
    p.add_argument("--table", metavar="JSONL", help="print the markdown table of a results file and exit")
    a = p.parse_args()
    if a.table:
        print(table(Path(a.table)))
        return
    run(a.rows, Path(a.out), a.base_sharding)


if __name__ == "__main__":
    main()
