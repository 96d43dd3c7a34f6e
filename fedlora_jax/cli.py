"""Command line: ``fedlora {train,eval,export-peft,plot,devices}`` (also ``python -m fedlora_jax``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.driver.plots import plot_run
    from fedlora_jax.driver.run import run_experiment

    cfg = load_config(args.config, variant=args.variant, overrides=args.override)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    run_experiment(cfg, out, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after)
    if not args.no_plots and cfg.task == "causal_lm":
        print("plots: skipped (the plots show accuracy; a causal-LM run logs perplexity)", file=sys.stderr)
    elif not args.no_plots:
        for p in plot_run(out):
            print(f"wrote {p}", file=sys.stderr)
    print(str(out))
    return 0


def _cmd_eval(args) -> int:
    from fedlora_jax.driver.evaluate import evaluate_run

    print(json.dumps(evaluate_run(args.run), indent=1))
    return 0


def _cmd_export(args) -> int:
    from fedlora_jax.driver.evaluate import export_run_peft

    path = export_run_peft(args.run, args.out)
    print(str(path))
    return 0


def _cmd_plot(args) -> int:
    from fedlora_jax.driver.plots import plot_run

    for p in plot_run(args.run):
        print(str(p))
    return 0


def _cmd_devices(args) -> int:
    from fedlora_jax.devices import PROFILES, load_profiles

    profiles = dict(PROFILES)
    if args.file:
        profiles.update(load_profiles(args.file))
    print(f"{'name':28s} {'peak TFLOP/s':>12s} {'eff':>5s} {'mem GB':>7s} {'power W':>8s} "
          f"{'up Mb/s':>8s} {'down Mb/s':>9s}")
    for name, p in profiles.items():
        print(f"{name:28s} {p.peak_flops / 1e12:12.2f} {p.efficiency:5.2f} {p.memory_bytes / 2**30:7.1f} "
              f"{p.power_watts:8.1f} {p.uplink_bps / 1e6:8.1f} {p.downlink_bps / 1e6:9.1f}")
    return 0


def ckpt_error():
    from fedlora_jax.driver.checkpoint import CheckpointError

    return CheckpointError


def lock_error():
    from fedlora_jax.driver.lock import RunLockedError

    return RunLockedError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run (or resume) an experiment from a config file")
    t.add_argument("--config", required=True, help="experiments/configs/<name>.py (get_config) or a .json")
    t.add_argument("--variant", default="full", help="config variant, e.g. 'smoke'")
    t.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. -o rounds=3 -o algo.target_rank=2")
    t.add_argument("--out", help="run directory (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--no-plots", action="store_true")
    t.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint on its test set")
    e.add_argument("run")
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export-peft", help="export a run's adapter as a PEFT adapter directory")
    x.add_argument("run")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_cmd_export)
    pl = sub.add_parser("plot", help="write PNG plots of a run directory")
    pl.add_argument("run")
    pl.set_defaults(fn=_cmd_plot)
    d = sub.add_parser("devices", help="list device profiles of the cost model")
    d.add_argument("--file", help="also load user profiles from this JSON file")
    d.set_defaults(fn=_cmd_devices)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ckpt_error(), lock_error()) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
