"""Simulated *true* device speed and the times a device would report after a round.

The cost model (:mod:`fedlora_jax.devices.cost`) gives *nominal* times from a profile's
sustained FLOP/s and link rates. A capacity estimator (LEGEND's EMA,
``shared/papers/fedara_legend.md`` sec. 2.3) can only learn something if the reported times
come from a device whose real speed differs from what the server assumes. This module
simulates that real speed and the resulting reports, as pure, seeded NumPy functions (host
side, float64):

* :func:`true_speed_factor`: ``[C]`` multiplicative factor on the nominal speed of each id in
  a round, a log-normal random walk (slow drift: thermal state, background load, signal
  quality) times a per-round log-normal jitter;
* :func:`measure_round`: the compute / uplink / downlink / total seconds a device reports for
  the work it was given, at its true speed.

Everything is a function of ``(seed, round, id, tag)`` only, so a resumed run reproduces the
same factors without carrying any state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedlora_jax.devices.profiles import DeviceArrays, DeviceProfile

_WALK, _JITTER = 0, 1  # sub-streams of one (seed, id, tag)


def _check_nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


def _check_nonneg_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def true_speed_factor(ids, round_idx: int, *, seed: int, drift: float = 0.0, noise: float = 0.0,
                      tag: int = 0) -> np.ndarray:
    """True speed of each id in round ``round_idx``, as a factor ``[C]`` on its nominal speed.

    ``factor = exp(drift * sum_{t=1..round_idx} z_t(id) + noise * e_round(id))`` with standard
    normal ``z_t`` (the random-walk increments) and ``e`` (the jitter). A factor 0.5 means the
    device runs at half its profile's sustained FLOP/s (or link rate): its times double.

    Reproducibility without state: ``z_1, z_2, ...`` of an id are the successive draws of its
    own stream ``default_rng([seed, id, tag, 0])``, so ``z_t`` is the same whatever
    ``round_idx`` is asked (the walk of round ``r`` is the prefix sum of the same increments);
    ``e`` comes from ``default_rng([seed, round_idx, id, tag, 1])``. An id's factor does not
    depend on the other ids in the call. Cost ``O(C * round_idx)`` draws.

    ASSUMPTIONS (not from the paper): the walk has no mean reversion (its log std grows as
    ``drift * sqrt(round_idx)``; keep ``drift`` small for long runs); the median factor is 1
    (no log-normal mean correction); round 0 has no drift (the walk starts at the nominal
    speed). Which entity drifts is the caller's choice: pass **client ids** for one walk per
    physical device (the intended use: clients of the same profile differ), or profile ids
    for one walk per device type. Use different ``tag`` values for independent factors, e.g.
    ``tag=0`` compute and ``tag=1`` links.

    Args:
      ids: ``[C]`` non-negative int ids (client or device ids).
      round_idx: round index ``>= 0``.
      seed: experiment seed ``>= 0``.
      drift: per-round std of the log random walk (``>= 0``).
      noise: std of the per-round log jitter (``>= 0``).
      tag: stream tag ``>= 0`` (independent factors for the same ids).

    Returns:
      ``[C]`` float64 factors ``> 0`` (exactly 1 where ``drift == noise == 0``).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0)):
        raise ValueError(f"ids must be a 1-D array of non-negative ints, got {ids!r}")
    r = _check_nonneg_int("round_idx", round_idx)
    seed = _check_nonneg_int("seed", seed)
    tag = _check_nonneg_int("tag", tag)
    drift = _check_nonneg_float("drift", drift)
    noise = _check_nonneg_float("noise", noise)
    log_f = np.zeros(ids.shape, np.float64)
    if drift > 0 and r > 0:
        log_f += drift * np.array([np.random.default_rng([seed, int(c), tag, _WALK]).standard_normal(r).sum()
                                   for c in ids], np.float64).reshape(ids.shape)
    if noise > 0:
        log_f += noise * np.array([np.random.default_rng([seed, r, int(c), tag, _JITTER]).standard_normal()
                                   for c in ids], np.float64).reshape(ids.shape)
    return np.exp(log_f)


class MeasuredTimes(NamedTuple):
    """Seconds a device reports after a round, each ``[C]`` float64.

    Attributes:
      compute_s: local training time.
      up_s: upload time.
      down_s: download time.
      total_s: ``compute_s + up_s + down_s``.
    """

    compute_s: np.ndarray
    up_s: np.ndarray
    down_s: np.ndarray
    total_s: np.ndarray


def _positive(name: str, x, shape) -> np.ndarray:
    a = np.asarray(x, np.float64)
    try:
        a = np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name} must broadcast to {shape}, got shape {np.shape(x)}") from None
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError(f"{name} must be finite and > 0, got {a!r}")
    return a


def measure_round(flops, bytes_up, bytes_down, devices: DeviceArrays | DeviceProfile, factors, *,
                  link_factors=None) -> MeasuredTimes:
    """Times ``[C]`` that devices running at ``factors`` times their nominal speed report.

    ``compute_s = flops / (peak * efficiency * factor)``, ``up_s = 8 bytes_up / (uplink *
    link_factor)``, ``down_s = 8 bytes_down / (downlink * link_factor)``. With factors 1 this
    is :func:`fedlora_jax.devices.client_time` (``up_s + down_s`` = its ``comm_s``), in float64.

    Args:
      flops: ``[C]`` training FLOPs of each client's round.
      bytes_up: ``[C]`` uploaded bytes.
      bytes_down: ``[C]`` downloaded bytes.
      devices: :class:`DeviceArrays` ``[C]`` (e.g. ``take_devices(table, device_ids)``) or
        one :class:`DeviceProfile`.
      factors: ``[C]`` true-speed factors on compute (e.g. :func:`true_speed_factor`).
      link_factors: ``[C]`` factors on both links; ``None`` = ``factors``.

    Returns:
      :class:`MeasuredTimes`.
    """
    fl = np.asarray(flops, np.float64)
    if fl.ndim != 1:
        raise ValueError(f"flops must be a 1-D [C] array, got shape {fl.shape}")
    shape = fl.shape
    if np.any(~np.isfinite(fl) | (fl < 0)):
        raise ValueError(f"flops must be finite and >= 0, got {fl!r}")
    up, dn = (np.broadcast_to(np.asarray(b, np.float64), shape) for b in (bytes_up, bytes_down))
    if np.any(up < 0) or np.any(dn < 0):
        raise ValueError(f"bytes_up/bytes_down must be >= 0, got {up!r}, {dn!r}")
    f = _positive("factors", factors, shape)
    lf = f if link_factors is None else _positive("link_factors", link_factors, shape)
    speed = _positive("devices.peak_flops * efficiency",
                      np.asarray(devices.peak_flops, np.float64) * np.asarray(devices.efficiency, np.float64),
                      shape)
    uplink = _positive("devices.uplink_bps", devices.uplink_bps, shape)
    downlink = _positive("devices.downlink_bps", devices.downlink_bps, shape)
    compute = fl / (speed * f)
    up_s = 8.0 * up / (uplink * lf)
    down_s = 8.0 * dn / (downlink * lf)
    return MeasuredTimes(compute, up_s, down_s, compute + up_s + down_s)
