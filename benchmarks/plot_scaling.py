"""Plot client-steps/s against the number of clients C from ``round_bench.py`` JSON lines.

Usage (from ``benchmarks/``)::

    python round_bench.py --clients 8 16 32 64 128 --rounds 2 --peer --out results/round_cpu_scaling.jsonl
    python plot_scaling.py results/round_cpu_scaling.jsonl --out results/round_cpu_scaling.png

One line for ours and one for the peer (rows with ``client_steps_per_s``); the title names the
hardware and date from the file's ``env`` row. Rows of a different pooling / size than the first
row of ours are refused, so one plot never mixes workloads.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedlora_jax._atomic import atomic_write_bytes  # noqa: E402


def load_rows(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """``(env, ours, peer)`` rows of one ``round_bench.py --out`` file."""
    env, ours, peer = {}, [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        if row.get("kind") == "env":
            env = row
        elif "client_steps_per_s" in row:
            (peer if row.get("system", "").startswith("torch") else ours).append(row)
    if not ours:
        raise ValueError(f"{path}: no rows of ours with client_steps_per_s (is it a round_bench.py --out file?)")
    workload = {k: ours[0].get(k) for k in ("size", "pooling", "steps", "batch", "seq", "rank", "dtype")}
    for r in ours:
        got = {k: r.get(k) for k in workload}
        if got != workload:
            raise ValueError(f"{path}: rows of different workloads ({workload} vs {got}); plot them separately")
    return env, ours, peer


def plot(env: dict, ours: list[dict], peer: list[dict]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for rows, label, marker in ((ours, "fedlora_jax (one jit, chunked vmap)", "o"),
                                (peer, "torch + peft, sequential (peer)", "s")):
        if rows:
            rows = sorted(rows, key=lambda r: r["clients"])
            ax.plot([r["clients"] for r in rows], [r["client_steps_per_s"] for r in rows], marker=marker,
                    label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients per round C")
    ax.set_ylabel("client-steps / s")
    ax.set_ylim(bottom=0)
    w = ours[0]
    ax.set_title(f"{w.get('size')} {w.get('pooling', '')} B={w.get('batch')} T={w.get('seq')} r={w.get('rank')} "
                 f"{w.get('dtype')}\n{env.get('cpu', env.get('device', '?'))}, {env.get('cores', '?')} cores, "
                 f"{env.get('date', '?')}, jax {env.get('jax', '?')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("jsonl", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    atomic_write_bytes(a.out, plot(*load_rows(a.jsonl)))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
