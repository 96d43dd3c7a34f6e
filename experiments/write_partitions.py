"""Write the missing ``partition.txt`` of finished comparison runs (runs made before
``run_comparison.py`` kept it), from each run's own ``config.json``.

Usage::

    python experiments/write_partitions.py [--results experiments/results] [comparison ...]

The table comes from ``driver.setup.classification_partition_table`` (the same data loading and
partitioning as the run; tested equal to the file the driver writes). Runs of a task without
labels, and runs that already have the file, are left alone. Files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def missing_runs(results: Path, names) -> list[Path]:
    """Run directories under ``results/<name>/`` with a summary.json and no partition.txt."""
    out = []
    for name in names:
        for d in sorted((results / name).iterdir()) if (results / name).is_dir() else ():
            if (d / "summary.json").exists() and not (d / "partition.txt").exists():
                out.append(d)
    return out


def main(argv=None) -> int:
    from fedlora_jax._atomic import atomic_write_bytes
    from fedlora_jax.driver.config import from_dict
    from fedlora_jax.driver.setup import classification_partition_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("names", nargs="*", help="comparisons (default: every directory under --results)")
    args = p.parse_args(argv)
    results = Path(args.results)
    names = args.names or sorted(d.name for d in results.iterdir() if d.is_dir())
    for d in missing_runs(results, names):
        cfg = from_dict(json.loads((d / "config.json").read_text()))
        if cfg.task == "causal_lm":
            continue
        atomic_write_bytes(d / "partition.txt", (classification_partition_table(cfg) + "\n").encode())
        print(f"wrote {d / 'partition.txt'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
