"""Device profiles: compute, memory, power and link figures of the simulated clients.

Sources: peak compute, memory and power come from the vendors' published specifications
(cited next to each value; derived numbers show their arithmetic). They were written from
those public spec sheets and NOT re-checked online in this session; override them from a
JSON file (:func:`load_profiles`) for your own hardware.

ASSUMPTIONS (documented, override per profile):
  * ``efficiency``: the *sustained* fraction of peak FLOP/s that LoRA fine-tuning reaches
    (small batches, attention, layer norms, memory-bound kernels). Typical measured values are
    20-45 % for GPUs and lower for CPUs / mobile GPUs; the defaults below are judgement calls.
  * ``uplink_bps`` / ``downlink_bps``: assumed *typical links*, not device limits: a shared
    Wi-Fi 5/6 network for the edge boards and the laptop, a 5G cellular link for the phone,
    a datacenter Ethernet link for the H100.
  * ``power_watts``: typical board power while training (between the vendor's power modes);
    ``radio_watts``: extra power while the radio transmits/receives (Wi-Fi ~1-2 W, cellular
    ~2-3 W, a datacenter NIC ~20 W); ``idle_watts``: power while waiting (optional).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

GB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    """One device class.

    Attributes:
      name: identifier.
      peak_flops: peak FLOP/s at ``precision`` (the precision training uses on it).
      memory_bytes: memory available to training (unified memory on Jetson / phones).
      power_watts: typical power while training (W).
      uplink_bps: uplink bandwidth, bits/s (ASSUMED typical link).
      downlink_bps: downlink bandwidth, bits/s (ASSUMED typical link).
      efficiency: sustained fraction of ``peak_flops`` (ASSUMPTION).
      radio_watts: extra power while communicating (ASSUMPTION).
      idle_watts: power while idle/waiting, or ``None`` (not modelled).
      precision: ``"fp16"``, ``"bf16"`` or ``"fp32"``: what ``peak_flops`` refers to.
    """

    name: str
    peak_flops: float
    memory_bytes: float
    power_watts: float
    uplink_bps: float
    downlink_bps: float
    efficiency: float = 0.3
    radio_watts: float = 1.5
    idle_watts: float | None = None
    precision: str = "fp16"

    def __post_init__(self):
        for f in ("peak_flops", "memory_bytes", "power_watts", "uplink_bps", "downlink_bps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 \
                    or not math.isfinite(v):
                raise ValueError(f"DeviceProfile {self.name!r}: {f} must be a finite number > 0, "
                                 f"got {v!r}")
            object.__setattr__(self, f, float(v))
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError(f"DeviceProfile {self.name!r}: efficiency must be in (0, 1], "
                             f"got {self.efficiency!r}")
        if self.radio_watts < 0 or (self.idle_watts is not None and self.idle_watts < 0):
            raise ValueError(f"DeviceProfile {self.name!r}: radio_watts/idle_watts must be >= 0")
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"DeviceProfile {self.name!r}: precision must be fp16, bf16 or fp32, "
                             f"got {self.precision!r}")

    @property
    def sustained_flops(self) -> float:
        """``peak_flops * efficiency`` (FLOP/s actually reached, ASSUMPTION)."""
        return self.peak_flops * self.efficiency


# Link ASSUMPTIONS (typical effective throughput, not device limits).
_WIFI_EDGE = dict(uplink_bps=20e6, downlink_bps=50e6, radio_watts=1.5)      # shared Wi-Fi 5
_WIFI_LAPTOP = dict(uplink_bps=50e6, downlink_bps=200e6, radio_watts=2.0)   # Wi-Fi 6
_CELL_5G = dict(uplink_bps=20e6, downlink_bps=100e6, radio_watts=2.5)       # 5G sub-6 GHz
_DC_LINK = dict(uplink_bps=25e9, downlink_bps=25e9, radio_watts=20.0)       # 25 GbE NIC

PROFILES: dict[str, DeviceProfile] = {
    "jetson_agx_orin_64gb": DeviceProfile(
        name="jetson_agx_orin_64gb",
        # NVIDIA Jetson AGX Orin Series Technical Brief: GPU 170 sparse INT8 TOPS
        # -> 85 dense INT8 -> 42.5 dense FP16 tensor TFLOPS (derived: /2 sparsity, /2 int8->fp16).
        peak_flops=42.5e12,
        memory_bytes=64 * GB,     # datasheet: 64 GB 256-bit LPDDR5 (unified CPU/GPU)
        power_watts=40.0,         # datasheet power modes 15-60 W; ASSUMPTION typical training 40 W
        efficiency=0.25,          # ASSUMPTION
        idle_watts=7.0,           # ASSUMPTION
        precision="fp16",
        **_WIFI_EDGE,
    ),
    "jetson_orin_nano_8gb": DeviceProfile(
        name="jetson_orin_nano_8gb",
        # NVIDIA Jetson Orin Nano datasheet: 40 sparse INT8 TOPS (1024-core Ampere, 32 tensor
        # cores, 625 MHz) -> 10 dense FP16 tensor TFLOPS (derived: /2 sparsity, /2 int8->fp16).
        peak_flops=10e12,
        memory_bytes=8 * GB,      # datasheet: 8 GB 128-bit LPDDR5 (unified)
        power_watts=15.0,         # datasheet power modes 7-15 W; the 15 W mode
        efficiency=0.25,          # ASSUMPTION
        idle_watts=3.0,           # ASSUMPTION
        precision="fp16",
        **_WIFI_EDGE,
    ),
    "raspberry_pi_5_8gb": DeviceProfile(
        name="raspberry_pi_5_8gb",
        # Raspberry Pi 5 product brief: 4x Cortex-A76 @ 2.4 GHz. Derived FP32 NEON peak:
        # 4 cores * 2.4e9 Hz * 16 FLOP/cycle (2x 128-bit FMA pipes) = 153.6 GFLOP/s.
        peak_flops=153.6e9,
        memory_bytes=8 * GB,      # product brief: 8 GB LPDDR4X-4267
        power_watts=7.0,          # 27 W (5 V / 5 A) supply is the cap; ASSUMPTION ~7 W all-core load
        efficiency=0.2,           # ASSUMPTION (CPU, fp32 training)
        idle_watts=2.5,           # ASSUMPTION
        precision="fp32",
        **_WIFI_EDGE,
    ),
    "phone_snapdragon_8_gen_2": DeviceProfile(
        name="phone_snapdragon_8_gen_2",
        # Snapdragon 8 Gen 2 (Adreno 740 GPU): no official FLOP figure from Qualcomm;
        # ASSUMPTION ~2 TFLOP/s FP32-class from commonly reported Adreno 740 throughput,
        # used at fp16 with no tensor-core speed-up assumed.
        peak_flops=2.0e12,
        memory_bytes=8 * GB,      # common flagship configuration (8-16 GB LPDDR5X)
        power_watts=5.0,          # ASSUMPTION: sustained SoC power under thermal limits
        efficiency=0.15,          # ASSUMPTION (mobile frameworks, thermal throttling)
        idle_watts=0.5,           # ASSUMPTION
        precision="fp16",
        **_CELL_5G,
    ),
    "laptop_rtx_4060": DeviceProfile(
        name="laptop_rtx_4060",
        # NVIDIA GeForce RTX 4060 Laptop GPU spec page: 3072 CUDA cores, boost up to 2370 MHz
        # -> FP32 = 3072 * 2 * 2.37e9 = 14.6 TFLOP/s (derived).
        peak_flops=14.6e12,
        memory_bytes=8 * GB,      # spec page: 8 GB GDDR6
        power_watts=80.0,         # spec page: 35-115 W TGP range; ASSUMPTION 80 W typical
        efficiency=0.4,           # ASSUMPTION
        idle_watts=10.0,          # ASSUMPTION (laptop, GPU idle)
        precision="fp32",
        **_WIFI_LAPTOP,
    ),
    "datacenter_h100_sxm": DeviceProfile(
        name="datacenter_h100_sxm",
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16/FP16 989 TFLOPS dense
        # (1,979 with sparsity), 80 GB HBM3, up to 700 W max TDP.
        peak_flops=989e12,
        memory_bytes=80 * GB,
        power_watts=700.0,        # datasheet max TDP; ASSUMPTION training runs near it
        efficiency=0.4,           # ASSUMPTION (MFU of well-tuned training ~35-50 %)
        idle_watts=70.0,          # ASSUMPTION
        precision="bf16",
        **_DC_LINK,
    ),
}

_REQUIRED = ("name", "peak_flops", "memory_bytes", "power_watts", "uplink_bps", "downlink_bps")
_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile))


def get_profile(name: str) -> DeviceProfile:
    """A built-in profile by name (``ValueError`` listing the known names otherwise)."""
    if name not in PROFILES:
        raise ValueError(f"unknown device profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name]


def profile_from_dict(d: Mapping, *, where: str = "profile") -> DeviceProfile:
    """Build a :class:`DeviceProfile` from a mapping; errors name missing/unknown fields."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected an object with fields {_REQUIRED}, got "
                        f"{type(d).__name__}")
    missing = [f for f in _REQUIRED if f not in d]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}; required: {list(_REQUIRED)}")
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {list(_FIELDS)}")
    return DeviceProfile(**dict(d))


def load_profiles(path: str | os.PathLike) -> dict[str, DeviceProfile]:
    """Load profiles from a JSON file (parsed with ``json``, never evaluated).

    The file holds a list of profile objects, or an object ``{name: {fields}}`` (the key is
    used as ``name`` when the entry has none). Fields are those of :class:`DeviceProfile`.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: on bad JSON, missing or unknown fields, duplicate names or bad values.
    """
    with open(path, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
    if isinstance(raw, Mapping):
        items = [(f"{path}[{k!r}]", {"name": k, **v} if isinstance(v, Mapping) else v)
                 for k, v in raw.items()]
    elif isinstance(raw, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(raw)]
    else:
        raise ValueError(f"{path}: expected a JSON list or object of profiles, got "
                         f"{type(raw).__name__}")
    out: dict[str, DeviceProfile] = {}
    for where, entry in items:
        p = profile_from_dict(entry, where=where)
        if p.name in out:
            raise ValueError(f"{where}: duplicate profile name {p.name!r}")
        out[p.name] = p
    return out


class DeviceArrays(NamedTuple):
    """Profile figures as arrays (``[D]`` for a table, ``[C]`` after :func:`take_devices`).

    Same attribute names as :class:`DeviceProfile`, so the cost functions accept either.
    ``idle_watts`` is 0 where a profile has none.
    """

    peak_flops: Array
    memory_bytes: Array
    power_watts: Array
    uplink_bps: Array
    downlink_bps: Array
    efficiency: Array
    radio_watts: Array
    idle_watts: Array


def stack_profiles(profiles: Sequence[DeviceProfile]) -> DeviceArrays:
    """Stack profiles into float32 ``[D]`` arrays (index ``d`` = ``profiles[d]``)."""
    if not profiles:
        raise ValueError("profiles is empty")
    col = lambda f: jnp.asarray([float(getattr(p, f) or 0.0) for p in profiles], jnp.float32)
    return DeviceArrays(*(col(f) for f in DeviceArrays._fields))


def take_devices(table: DeviceArrays, device_ids: Array) -> DeviceArrays:
    """Per-client figures ``[C]`` from a table ``[D]`` and int ``device_ids [C]`` (jittable)."""
    return DeviceArrays(*(jnp.take(x, device_ids, axis=0) for x in table))
