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
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(run_dir)
    init = next((r for r in rows if r["round"] == -1), None)
    evals = [r for r in rows if r["round"] >= 0 and "test_accuracy" in r]
    written = []

    def series(xkey, scale):
        """(x, accuracy) with the before-training point first: x = -1 on the round axis, 0 otherwise."""
        xs = [-1.0 if xkey == "round" else 0.0] if init is not None else []
        ys = [init["test_accuracy"]] if init is not None else []
        for r in evals:
            xs.append(r[xkey] / scale)
            ys.append(r["test_accuracy"])
        return xs, ys

    # Rounds are numbered as in metrics.jsonl: 0 .. rounds-1; -1 is the evaluation before training.
    for xkey, scale, label, title, fname in (
            ("round", 1, "round (as in metrics.jsonl; -1 = before training)",
             "Test accuracy of the global model after each round", "accuracy_vs_round.png"),
            ("cum_bytes_up", 1e6, "cumulative uplink, all clients (MB)",
             "Test accuracy vs uplink traffic", "accuracy_vs_bytes.png"),
            ("cum_sim_time_s", 1, "cumulative simulated round time (s, slowest client per round)",
             "Test accuracy vs simulated time", "accuracy_vs_simtime.png")):
        xs, ys = series(xkey, scale)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="o")
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        if xkey == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(out / fname)

    trained = [r for r in rows if r["round"] >= 0 and "active_ranks" in r]
    if trained:
        keys = sorted(trained[0]["active_ranks"])
        grid = np.array([[float(np.mean(r["active_ranks"][k])) for k in keys] for r in trained]).T
        fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(keys) + 1.2)))
        rounds = [r["round"] for r in trained]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0,
                       vmax=max(1.0, float(grid.max())),
                       extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(keys) - 0.5, -0.5))
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(keys, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (as in metrics.jsonl)")
        ax.set_title("Active LoRA rank per module: mean over each round's sampled clients", fontsize=10)
        fig.colorbar(im, ax=ax, label="active rank (mean over sampled clients)")
        fig.tight_layout()
        fig.savefig(out / "rank_map.png", dpi=100)
        plt.close(fig)
        written.append(out / "rank_map.png")
    return written
