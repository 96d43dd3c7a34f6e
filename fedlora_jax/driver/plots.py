"""Plots of a run directory's ``metrics.jsonl`` (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``accuracy_vs_round.png``, ``accuracy_vs_bytes.png``, ``accuracy_vs_simtime.png`` and
    ``rank_map.png`` (active ranks per module over rounds) into ``<run_dir>/plots``.

    Returns the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(run_dir)
    init = next((r for r in rows if r["round"] == -1), None)
    evals = [r for r in rows if r["round"] >= 0 and "test_accuracy" in r]
    written = []

    def series(xkey):
        xs = [0.0 if init is not None else None] if init is not None else []
        ys = [init["test_accuracy"]] if init is not None else []
        for r in evals:
            xs.append(r["round"] + 1 if xkey == "round" else r[xkey])
            ys.append(r["test_accuracy"])
        return xs, ys

    for xkey, label, fname in (("round", "round", "accuracy_vs_round.png"),
                               ("cum_bytes_up", "cumulative uplink bytes", "accuracy_vs_bytes.png"),
                               ("cum_sim_time_s", "simulated time (s)", "accuracy_vs_simtime.png")):
        xs, ys = series(xkey)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(out / fname)

    trained = [r for r in rows if r["round"] >= 0 and "active_ranks" in r]
    if trained:
        keys = sorted(trained[0]["active_ranks"])
        grid = np.array([[float(np.mean(r["active_ranks"][k])) for k in keys] for r in trained]).T
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.25 * len(keys))))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(keys, fontsize=6)
        ax.set_xlabel("round")
        ax.set_title("mean active rank per module")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "rank_map.png", dpi=100)
        plt.close(fig)
        written.append(out / "rank_map.png")
    return written
