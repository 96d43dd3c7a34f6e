"""Run every method x seed (x sweep value) of one comparison config, resumably.

Usage::

    python experiments/run_comparison.py --config experiments/configs/byun_lee.py \
        [--variant full|smoke] [--seeds 0 1 2] [--out experiments/results/byun_lee] [--jobs 1] \
        [--only replication hetlora] [--sweep-values 0.1]

``--only`` keeps the runs of these exact method labels, ``--sweep-values`` those of these SWEEP
values (as written in the run names); both together add some arms' later seeds to a comparison.

A comparison config module defines ``get_config(variant) -> ExperimentConfig`` (the base),
``METHODS = {label: {"algorithm": ..., "algo": {...}, <other ExperimentConfig overrides>}}``,
``SEEDS`` and optionally ``SWEEP = {field: (v1, v2, ...)}`` (one field). A method's override may
be a function of the base config (``{"client_groups": lambda base: ...}``), so that it follows the
smoke variant's sizes. Each run writes
``<out>/<label>[_<field><value>]_s<seed>/{metrics.jsonl, summary.json, config.json}``; a run
whose ``summary.json`` exists is skipped, so an interrupted comparison resumes. Checkpoints go
to a temporary directory and are deleted (only the small JSON files are kept for git).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fedlora_jax.driver.config import ExperimentConfig, apply_overrides

KEEP_FILES = ("metrics.jsonl", "summary.json", "config.json", "partition.txt")


def load_module(path: str | Path):
    """Import a comparison config module from its file path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"comparison_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("get_config", "METHODS"):
        if not hasattr(module, attr):
            raise ValueError(f"comparison config {str(path)!r} defines no {attr}")
    return module


def sweep_items(module) -> list[tuple[str | None, object]]:
    """``[(field, value), ...]`` of the module's SWEEP (one field), or ``[(None, None)]``."""
    sweep = getattr(module, "SWEEP", None) or {}
    if len(sweep) > 1:
        raise ValueError(f"SWEEP must have at most one field, got {sorted(sweep)}")
    if not sweep:
        return [(None, None)]
    (field, values), = sweep.items()
    return [(field, v) for v in values]


def run_name(label: str, seed: int, field: str | None = None, value=None) -> str:
    """Directory name of one run: ``<label>[_<field><value>]_s<seed>``."""
    mid = "" if field is None else f"_{field}{value}"
    return f"{label}{mid}_s{seed}"


def make_run_config(base: ExperimentConfig, label: str, method: dict, *, seed: int,
                    field: str | None = None, value=None) -> ExperimentConfig:
    """The base config with the method's overrides, the seed and the sweep value applied."""
    changes = {k: v(base) if callable(v) else v for k, v in method.items()}
    changes.setdefault("algo", {})  # a method never inherits the base config's algorithm options
    changes["seed"] = seed
    if field is not None:
        changes[field] = value
    changes["name"] = f"{base.name}/{run_name(label, seed, field, value)}"
    for key in ("algo", "aggregator_options"):
        if key in changes:
            changes[key] = dict(changes[key])
    return dataclasses.replace(base, **changes)


def plan_runs(module, variant: str, seeds, overrides: list[str] | None = None
              ) -> list[tuple[str, ExperimentConfig]]:
    """Every (run directory name, config) of the comparison, in a deterministic (seed-major) order;
    ``overrides`` (``key=value``) change the base config first."""
    base = apply_overrides(module.get_config(variant), overrides)
    runs = []
    for field, value in sweep_items(module):
        for seed in seeds:  # seed-major: a partial comparison holds complete paired seeds
            for label, method in module.METHODS.items():
                cfg = make_run_config(base, label, method, seed=seed, field=field, value=value)
                runs.append((run_name(label, seed, field, value), cfg))
    return runs


def select_runs(module, runs, seeds, only=None, sweep_values=None):
    """The ``(name, config)`` of ``runs`` whose method label is in ``only`` (exact labels) and whose
    SWEEP value, as written in the run name, is in ``sweep_values`` (``None``: no filter). Unknown
    labels or values, or values for a config without a SWEEP, are refused."""
    items = sweep_items(module)
    labels = list(module.METHODS)
    if only:
        unknown = set(only) - set(labels)
        if unknown:
            raise ValueError(f"--only: unknown method labels {sorted(unknown)}; known {labels}")
        labels = [m for m in labels if m in only]
    if sweep_values:
        if items == [(None, None)]:
            raise ValueError("--sweep-values: this config has no SWEEP")
        known = {str(v) for _, v in items}
        unknown = set(sweep_values) - known
        if unknown:
            raise ValueError(f"--sweep-values: unknown values {sorted(unknown)}; known {sorted(known)}")
        items = [(f, v) for f, v in items if str(v) in sweep_values]
    # exact names: a prefix test would let "hafl_freeze" also select "hafl_freeze_balanced"
    wanted = {run_name(m, s, f, v) for m in labels for s in seeds for f, v in items}
    return [(n, c) for n, c in runs if n in wanted]


def run_one(name: str, cfg: ExperimentConfig, out_root: str, cache_dir: str | None) -> tuple[str, float, dict]:
    """Run one experiment in a temp dir; copy only the small JSON files to ``out_root/name``."""
    from fedlora_jax.driver.run import run_experiment

    final = Path(out_root) / name
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"fedlora_{name}_") as tmp:
        summary = run_experiment(cfg, tmp, quiet=True, cache_dir=None if cache_dir is None else Path(cache_dir))
        staging = Path(out_root) / f".{name}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for f in KEEP_FILES:
            if (Path(tmp) / f).exists():
                shutil.copy2(Path(tmp) / f, staging / f)
        wall = time.time() - t0
        summary = dict(summary, wall_s=round(wall, 2))
        (staging / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    return name, wall, summary


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Persistent XLA compilation cache: seeds of one method share the compiled round."""
    import jax

    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "fedlora_jax"
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variant", default="full", choices=("full", "smoke"))
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="run only these method labels")
    p.add_argument("--sweep-values", nargs="*", default=None, metavar="VALUE",
                   help="run only these values of the config's SWEEP field (as written in the run "
                        "directory names, e.g. 0.1)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                   help="override base-config fields of every run (e.g. lr=3e-3)")
    args = p.parse_args(argv)
    enable_compilation_cache(args.cache_dir)
    module = load_module(args.config)
    seeds = tuple(args.seeds) if args.seeds else tuple(getattr(module, "SEEDS", (0,)))
    out = Path(args.out or Path(__file__).parent / "results" / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(module, args.variant, seeds, args.set)
    runs = select_runs(module, runs, seeds, args.only, args.sweep_values)
    todo = [(n, c) for n, c in runs if not (out / n / "summary.json").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go -> {out}", flush=True)
    t0 = time.time()
    if args.jobs <= 1:
        results = (run_one(n, c, str(out), args.cache_dir) for n, c in todo)
        for name, wall, s in results:
            print(f"{name}: acc {s['final_test_accuracy']:.4f} (best {s['best_test_accuracy']:.4f}) "
                  f"wall {wall:.1f}s total {time.time() - t0:.0f}s", flush=True)
    else:
        with ProcessPoolExecutor(args.jobs) as ex:
            futs = [ex.submit(run_one, n, c, str(out), args.cache_dir) for n, c in todo]
            for f in futs:
                name, wall, s = f.result()
                print(f"{name}: acc {s['final_test_accuracy']:.4f} wall {wall:.1f}s", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
