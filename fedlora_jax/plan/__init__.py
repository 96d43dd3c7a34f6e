"""Plan a TPU run from any CPU host: the config's exact round compiled by XLA:TPU for a topology.

- :func:`plan_round`: build, lower, compile; per-chip bytes vs HBM, FLOPs (loops counted),
  collectives, a roofline estimate. Needs ``libtpu`` (``pip install "fedlora_jax[tpu-plan]"``).
- :mod:`~fedlora_jax.plan.hlo`: FLOPs / collective / HBM traffic of a compiled program's text.
- :mod:`~fedlora_jax.plan.chips`: published per-chip peaks, each with its source.
"""

import os as _os

# libtpu's machine-wide lock file is for real TPU hosts; compiling only, several processes may share it.
_os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from fedlora_jax.plan.chips import CHIPS, Chip, chip_of_topology
from fedlora_jax.plan.core import (
    BASE_SHARDINGS,
    SHAPES,
    TPU_PLAN_INSTALL,
    analytic_flops_per_token,
    base_partition_spec,
    build_round,
    format_plan,
    make_mesh,
    parse_mesh,
    plan_json,
    plan_round,
    roofline,
    topology_devices,
)
from fedlora_jax.plan.hlo import HloCounts, count

__all__ = [
    "BASE_SHARDINGS", "CHIPS", "SHAPES", "TPU_PLAN_INSTALL", "Chip", "HloCounts", "analytic_flops_per_token",
    "base_partition_spec", "build_round", "chip_of_topology", "count", "format_plan", "make_mesh", "parse_mesh",
    "plan_json", "plan_round", "roofline", "topology_devices",
]
