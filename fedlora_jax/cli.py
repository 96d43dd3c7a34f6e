"""Command line: ``fedlora {train,eval,export-peft,plot,devices,plan}`` (also ``python -m fedlora_jax``).

Several processes (:mod:`fedlora_jax.federated.multiprocess`): ``fedlora train ...
--num-processes N`` starts N local processes on 127.0.0.1 (process 0 coordinates) and waits;
on a cluster run on every host ``fedlora train ... --coordinator HOST:PORT --process-id I
--num-processes N`` (HOST:PORT: process 0's host and a free port on it), or ``--coordinator
auto`` where JAX detects the cluster (Cloud TPU pod slices, SLURM, Open MPI).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

#: Test-only hook: the process whose id this names exits with code 17 right after joining the run.
FAIL_PROCESS_ENV = "FEDLORA_TEST_FAIL_PROCESS"
#: Seconds the launcher gives a process to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL if the launcher dies (even by SIGKILL); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(procs, grace_s: float) -> None:
    """SIGTERM every live process, SIGKILL those still alive after ``grace_s``; reap all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(argv: list[str], num_processes: int, *, timeout_s: float | None = None,
                 grace_s: float = STOP_GRACE_S) -> int:
    """Run ``fedlora <argv>`` as ``num_processes`` processes on 127.0.0.1 and wait for them.

    Process ``i`` gets ``--coordinator 127.0.0.1:PORT --process-id i`` (a free port; process 0
    runs the coordination service). If one process exits non-zero (or ``timeout_s`` passes),
    the others are stopped (SIGTERM, SIGKILL after ``grace_s``) and a clear error is printed.
    Every process started is stopped before this returns.

    Returns:
      0 when every process exited 0, else the failed process's exit code (1 for a signal or
      the timeout).
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen] = []
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        for i in range(num_processes):
            cmd = [sys.executable, "-m", "fedlora_jax", *argv, "--coordinator", coordinator, "--process-id", str(i)]
            procs.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                for i, c in failed:
                    how = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
                    print(f"error: process {i} of {num_processes} {how}; stopping the other processes",
                          file=sys.stderr)
                c = failed[0][1]
                return c if c > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: the {num_processes} processes did not finish within {timeout_s:g} s "
                      "(--launch-timeout); stopping them", file=sys.stderr)
                return 1
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("error: interrupted; stopping the processes", file=sys.stderr)
        return 130
    finally:
        _stop(procs, grace_s)
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _cmd_train(args) -> int:
    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 and args.coordinator is None:
        if args.process_id is not None:
            raise ValueError("--process-id needs --coordinator HOST:PORT (without it, --num-processes N starts "
                             "N local processes itself)")
        return launch_local(args.argv, args.num_processes, timeout_s=args.launch_timeout)
    primary = True
    if args.coordinator is not None:
        from fedlora_jax.federated import multiprocess as mp

        if args.coordinator == "auto":  # Cloud TPU, SLURM, Open MPI: JAX finds the processes itself
            index, _ = mp.initialize()
        elif args.process_id is None:
            raise ValueError("--coordinator HOST:PORT needs --process-id I and --num-processes N")
        else:
            index, _ = mp.initialize(args.coordinator, args.num_processes, args.process_id)
        primary = index == 0
        if os.environ.get(FAIL_PROCESS_ENV) == str(index):  # test-only: a process that dies
            print(f"process {index}: injected failure ({FAIL_PROCESS_ENV})", file=sys.stderr, flush=True)
            os._exit(17)
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.driver.modes import get_task_mode
    from fedlora_jax.driver.plots import plot_run
    from fedlora_jax.driver.run import run_experiment

    cfg = load_config(args.config, variant=args.variant, overrides=args.override)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    run_experiment(cfg, out, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after)
    if not primary:
        return 0
    mode = get_task_mode(cfg.task)
    if not args.no_plots and not mode.plots:
        print(f"plots: skipped (the plots show accuracy; a {cfg.task!r} run's headline is "
              f"{mode.headline_metric})", file=sys.stderr)
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
    info = json.loads((path / "fedlora_export.json").read_text())
    pool = f", then pool ({info['pooling']}) and apply head.safetensors" if info.get("pooling") else ""
    gguf = f" (gguf_file={info['gguf_file']!r})" if info.get("gguf_file") else ""
    print(str(path))
    print(f"{info['task_type']} adapter: load it with peft onto transformers' {info['auto_class']}"
          f".from_pretrained({info['base_model']!r}){gguf}{pool}; code: README, 'Using an exported adapter'")
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


def _cmd_plan(args) -> int:
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.plan import format_plan, plan_json, plan_round

    cfg = load_config(args.config, variant=args.variant, overrides=args.override)
    try:
        row = plan_round(cfg, args.topology, mesh=args.mesh, base_sharding=args.base_sharding,
                         progress=None if args.quiet else sys.stderr)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(row))
    print(plan_json(row))
    return 0 if row.get("fits") else 1


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
    t.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (refused, exit 2, where there is none)")
    t.add_argument("--quiet", action="store_true", help="no progress lines and no summary (errors still print)")
    t.add_argument("--no-plots", action="store_true", help="do not write the PNG plots into <out>/plots")
    t.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    t.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="run as N JAX processes whose mesh's clients axis spans them; alone: N local processes "
                        "on 127.0.0.1 (started and waited for here)")
    t.add_argument("--coordinator", metavar="HOST:PORT",
                   help="cluster: process 0's address (every host passes the same), with --process-id and "
                        "--num-processes; 'auto': let JAX detect the cluster (Cloud TPU pod slices, SLURM)")
    t.add_argument("--process-id", type=int, metavar="I", help="cluster: this host's process, in [0, N)")
    t.add_argument("--launch-timeout", type=float, default=None, metavar="SECONDS",
                   help="local launcher: stop every process and fail after this long (default: no limit)")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint on its test set")
    e.add_argument("run")
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export-peft", help="export a run's adapter as a PEFT adapter that reproduces the run "
                                          "in peft + transformers (README: 'Using an exported adapter')")
    x.add_argument("run")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_cmd_export)
    pl = sub.add_parser("plot", help="write PNG plots of a run directory")
    pl.add_argument("run")
    pl.set_defaults(fn=_cmd_plot)
    d = sub.add_parser("devices", help="list device profiles of the cost model")
    d.add_argument("--file", help="also load user profiles from this JSON file")
    d.set_defaults(fn=_cmd_devices)
    pn = sub.add_parser("plan", help="compile a config's round for a TPU topology with XLA:TPU on this host (needs "
                                     "libtpu, no TPU): HBM per chip, FLOPs, collectives, an estimated round time")
    pn.add_argument("--config", required=True, help="experiments/configs/<name>.py (get_config) or a .json")
    pn.add_argument("--variant", default="full", help="config variant, e.g. 'smoke'")
    pn.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable), e.g. -o clients_per_round=64 -o model=shape:llama-3-8b")
    pn.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:4x4")
    pn.add_argument("--mesh", default=None, metavar="clients=N[,model=M]",
                    help="mesh axes over the topology's chips (default: every chip on 'clients')")
    pn.add_argument("--base-sharding", default="megatron", choices=("megatron", "megatron-spmd", "fsdp", "replicated"),
                    help="placement of the frozen base on the 'model' axis (ignored without one)")
    pn.add_argument("--quiet", action="store_true", help="no progress lines while compiling")
    pn.set_defaults(fn=_cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ckpt_error(), lock_error()) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
