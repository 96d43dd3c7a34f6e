"""Helpers shared by the benchmark scripts: environment metadata and compile/run timing."""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_meta() -> dict:
    """Date, versions and hardware of this run, to store beside every number."""
    dev = jax.devices()[0]
    return {
        "kind": "meta",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def time_jit(fn, args, repeats: int) -> tuple[float, float, object]:
    """Return (compile_s, run_s_min, output) for ``jit(fn)`` on ``args`` (one untimed warm-up)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best, out
