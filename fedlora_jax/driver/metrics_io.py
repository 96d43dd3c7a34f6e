"""What a run writes and prints: ``metrics.jsonl`` lines, the console's progress line and
summary, ``summary.json``'s fields. Rounds are numbered as in ``metrics.jsonl`` and the
checkpoints: ``0 .. rounds-1``; ``"round": -1`` is the evaluation before training."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.federated import multiprocess as mp


def log(msg: str, *, quiet: bool) -> None:
    """One console line on stderr (nothing when ``quiet``)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def json_round(x):
    """Floats to 6 decimals for ``metrics.jsonl`` (other values unchanged)."""
    return round(x, 6) if isinstance(x, float) else x


def append_jsonl(path: Path, obj: dict) -> None:
    """Append one JSON line and fsync it (process 0 only: the others write nothing)."""
    if not mp.is_primary():
        return
    with open(path, "a") as f:
        f.write(json.dumps({k: json_round(v) for k, v in obj.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path, start: int) -> None:
    """Keep only lines of rounds ``< start`` (a killed run may have logged past its checkpoint)."""
    if not path.exists() or not mp.is_primary():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # a line torn by the kill itself: it belongs to an unfinished round
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); the metrics file is corrupt") from err
        if row["round"] < start:
            keep.append(ln)
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def read_metrics(path: str | Path) -> list[dict]:
    """Every line of a ``metrics.jsonl``."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def progress(r: int, rounds: int, line: dict, mode, t_run: float, done: int, *, quiet: bool) -> None:
    """The console line of round ``r``: a bar, ``round r [r+1/rounds]``, loss, the task's headline
    when the round was evaluated, cumulative uplink (MB) and simulated time, wall time, ETA."""
    if quiet:
        return
    eta = (time.time() - t_run) / done * (rounds - r - 1)
    bar_n = 20
    filled = int(bar_n * (r + 1) / rounds)
    head = mode.headline(line)
    print(f"[{'#' * filled}{'.' * (bar_n - filled)}] round {r:3d} [{r + 1}/{rounds}] "
          f"loss {line['train_loss']:.4f}{' ' + head if head else ''} up {line['cum_bytes_up'] / 1e6:.2f} MB "
          f"sim {line['cum_sim_time_s']:.1f}s wall {line['wall_s']:.1f}s eta {eta:.0f}s", file=sys.stderr, flush=True)


def summarize_run(rows: list[dict], cfg, mode, traces: int) -> dict:
    """``summary.json``'s fields from the run's metrics rows: the task's headline (initial /
    final / best), totals of traffic, simulated time and energy, compilations, fingerprint."""
    init = next((r for r in rows if r["round"] == -1), {})
    trained = [r for r in rows if r["round"] >= 0]
    evals = [r for r in trained if mode.headline_metric in r]
    last = trained[-1] if trained else {}
    return {
        "name": cfg.name, "algorithm": cfg.algorithm, "rounds_completed": len(trained),
        **mode.summarize(init, evals, last),
        "total_bytes_up": last.get("cum_bytes_up"), "total_bytes_down": last.get("cum_bytes_down"),
        "total_sim_time_s": last.get("cum_sim_time_s"), "total_energy_j": last.get("cum_energy_j"),
        "compilations_this_call": traces,
        "fingerprint": cfg.fingerprint(),
    }


def summary_text(s: dict, mode) -> str:
    """The console's end-of-run summary."""
    mb = lambda x: "n/a" if x is None else f"{x / 1e6:.2f} MB"
    return ("\n== summary ==\n"
            f"  algorithm           {s['algorithm']}\n"
            f"  rounds              {s['rounds_completed']}\n"
            f"  {mode.summary_line(s)}\n"
            f"  uplink / downlink   {mb(s['total_bytes_up'])} / {mb(s['total_bytes_down'])}\n"
            f"  simulated time      {s['total_sim_time_s'] or 0:.1f} s, "
            f"energy {(s['total_energy_j'] or 0) / 1e3:.2f} kJ\n"
            f"  compilations        {s['compilations_this_call']}\n")


def samples_text(samples: list[dict], path: Path, *, show: int = 3, width: int = 160) -> str:
    """The first ``show`` generated samples, each text on one line cut to ``width`` characters."""
    cut = lambda t: " ".join(t.split()) if len(t) <= width else " ".join(t.split())[: width - 3] + "..."
    lines = [f"== generated samples ({min(show, len(samples))} of {len(samples)}; all in {path}) =="]
    for x in samples[:show]:
        lines += [f"  prompt     {cut(x['prompt'])}", f"  generated  {cut(x['generated'])}",
                  f"  reference  {cut(x['reference'])}", ""]
    return "\n".join(lines)
