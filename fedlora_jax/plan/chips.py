"""Public per-chip figures of TPU generations, for the roofline estimate of :mod:`fedlora_jax.plan`.

Every figure is the vendor's published peak (never measured here); each row names its page.
``ici_bytes_per_s`` is the per-chip *bidirectional* inter-chip interconnect bandwidth, so a
collective time from it is optimistic (it assumes every link busy in both directions).
"""

from __future__ import annotations

from typing import NamedTuple


class Chip(NamedTuple):
    """One TPU chip's published peaks.

    Attributes:
      name: generation as in topology names (``"v5e"``).
      device_kind: ``jax`` device kind of the topology's devices.
      hbm_bytes: HBM capacity per chip.
      bf16_flops: peak dense bf16 FLOP/s per chip.
      hbm_bytes_per_s: HBM bandwidth per chip.
      ici_bytes_per_s: bidirectional ICI bandwidth per chip.
      source: the public page the figures come from.
    """

    name: str
    device_kind: str
    hbm_bytes: float
    bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    source: str


GiB = 2 ** 30
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 2400e9 / 8,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, ICI 2400 Gbps)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 400e9,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, "
                "bidirectional ICI 400 GB/s per chip)"),
    "v5p": Chip("v5p", "TPU v5", 95e9, 459e12, 2765e9, 4800e9 / 8,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 4800 Gbps)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32e9, 918e12, 1638e9, 800e9,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, "
                "bidirectional ICI 800 GB/s per chip)"),
}


def chip_of_topology(topology: str) -> Chip:
    """The :class:`Chip` of a topology name such as ``"v5e:4x4"`` or ``"v5p:2x2x1"``.

    Raises:
      ValueError: an unknown generation, naming the known ones.
    """
    gen = topology.split(":", 1)[0].strip().lower()
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {gen!r} in topology {topology!r}; known: {sorted(CHIPS)} "
                         "(topology names look like 'v5e:2x2', 'v5p:2x2x1', 'v6e:4x4')")
    return CHIPS[gen]
