"""LEGEND's configurator: capacity estimation and the greedy LoRA Configuration Determination.

Host-side NumPy/Python, run by the server between rounds (``shared/papers/fedara_legend.md``
sec. 2.3-2.5; everything here is the spec's ASSUMPTION-level reconstruction). A device trains
LoRA in its top ``d`` layers (``cut = L - d``) with per-layer ranks non-decreasing toward the
output; every adapted module of a layer gets that layer's rank. Costs come from
:mod:`fedlora_jax.devices` with the *estimated* capacities.

Layers are 0-based: layer ``L - 1`` is closest to the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedlora_jax.devices import DeviceProfile, ModelShape, client_flops, client_memory, payload_bytes


class CapacityEstimate(NamedTuple):
    """Server-side estimate of one device (sustained figures, EMA-updated).

    Attributes:
      name: device name.
      flops_per_s: sustained FLOP/s (``c_i``).
      uplink_bps: uplink bits/s.
      downlink_bps: downlink bits/s.
      memory_bytes: memory available for training.
    """

    name: str
    flops_per_s: float
    uplink_bps: float
    downlink_bps: float
    memory_bytes: float


class Measurement(NamedTuple):
    """What a device reports after a round (work done and the time it took)."""

    flops: float
    compute_s: float
    bytes_up: float = 0.0
    up_s: float = 0.0
    bytes_down: float = 0.0
    down_s: float = 0.0


class LoraConfig(NamedTuple):
    """One device's configuration.

    Attributes:
      depth: number of top layers with LoRA (0 = none fits).
      ranks: ``[L]`` int ranks per layer (0 below the depth).
      time_s: estimated round time of the device with this configuration.
      memory_bytes: estimated peak memory.
      feasible: fits the memory and meets the plan's deadline.
    """

    depth: int
    ranks: np.ndarray
    time_s: float
    memory_bytes: float
    feasible: bool


class LcdPlan(NamedTuple):
    """LCD result: per-device configurations, the chosen deadline ``T*`` and its score."""

    configs: list
    deadline: float
    score: float


def estimate_from_profile(profile: DeviceProfile) -> CapacityEstimate:
    """Initial estimate from a profile: ``peak * efficiency`` and the nominal links."""
    return CapacityEstimate(profile.name, profile.peak_flops * profile.efficiency,
                            profile.uplink_bps, profile.downlink_bps, profile.memory_bytes)


def update_estimate(est: CapacityEstimate, m: Measurement, *, rho: float = 0.8) -> CapacityEstimate:
    """EMA capacity update ``c <- rho c + (1 - rho) work / time`` (each link likewise).

    A component whose measured time or amount is not positive is left unchanged.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    ema = lambda old, work, t: (rho * old + (1 - rho) * work / t) if (t > 0 and work > 0) else old
    return est._replace(flops_per_s=ema(est.flops_per_s, m.flops, m.compute_s),
                        uplink_bps=ema(est.uplink_bps, 8.0 * m.bytes_up, m.up_s),
                        downlink_bps=ema(est.downlink_bps, 8.0 * m.bytes_down, m.down_s))


def _check_lrd(L: int, d: int, r_min: int | None = None, r_max: int | None = None) -> None:
    if not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
    if not isinstance(d, (int, np.integer)) or not 0 <= d <= L:
        raise ValueError(f"depth d must be an int in [0, L={L}], got {d!r}")
    if r_min is not None and not (1 <= r_min <= r_max):
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min!r}, r_max={r_max!r}")


def depth_mask(L: int, d: int) -> np.ndarray:
    """``[L]`` bool: True for the top ``d`` layers ``L - d .. L - 1``."""
    _check_lrd(L, d)
    return np.arange(L) >= L - d


def rank_ramp(L: int, d: int, budget: int, r_min: int, r_max: int, *, slope: int = 1) -> np.ndarray:
    """Per-layer ranks ``[L]`` non-decreasing toward the output, summing to the budget.

    The top ``d`` layers get a linear ramp ``clip(top - slope * k, r_min, r_max)`` (``k`` =
    distance from the output) with the largest ``top`` that fits ``budget``; the remainder
    goes one rank each to the layers nearest the output that can take it without breaking the
    order. ``budget`` is clipped to ``[d r_min, d r_max]`` (so the sum may exceed a budget
    below ``d r_min``). Layers below the depth get 0.
    """
    _check_lrd(L, d, r_min, r_max)
    if slope < 0:
        raise ValueError(f"slope must be >= 0, got {slope}")
    out = np.zeros(L, np.int64)
    if d == 0:
        return out
    budget = int(np.clip(budget, d * r_min, d * r_max))
    k = np.arange(d)
    ramp = lambda top: np.clip(top - slope * k, r_min, r_max)
    top = r_min
    for cand in range(r_min, r_max + slope * (d - 1) + 1):
        if ramp(cand).sum() > budget:
            break
        top = cand
    r = ramp(top)
    left = budget - int(r.sum())
    for i in range(d):
        if left == 0:
            break
        if r[i] < r_max and (i == 0 or r[i] + 1 <= r[i - 1]):
            r[i] += 1
            left -= 1
    out[L - d:] = r[::-1]
    return out


def config_cost(est: CapacityEstimate, shape: ModelShape, layer_ranks: np.ndarray, depth: int, *,
                batch: int, steps: int, bytes_per_param: int = 4,
                memory_kwargs: Mapping | None = None) -> tuple[float, float]:
    """Estimated ``(time_s, memory_bytes)`` of one device for ``(depth, layer_ranks [L])``."""
    ranks = np.repeat(np.asarray(layer_ranks)[:, None], len(shape.modules), axis=1)
    cut = shape.num_layers - depth
    fl = float(client_flops(ranks, cut, shape, batch=batch, steps=steps))
    mem = float(client_memory(ranks, cut, shape, batch=batch, **dict(memory_kwargs or {})))
    by = float(payload_bytes(ranks, shape, bytes_per_param=bytes_per_param))
    t = fl / est.flops_per_s + 8.0 * by / est.uplink_bps + 8.0 * by / est.downlink_bps
    return t, mem


def lcd_plan(estimates: Sequence[CapacityEstimate | DeviceProfile], shape: ModelShape, *,
             r_min: int, r_max: int, batch: int, steps: int, deadline: float | None = None,
             weights: Sequence[float] | None = None, bytes_per_param: int = 4, slope: int = 1,
             memory_kwargs: Mapping | None = None) -> LcdPlan:
    """Greedy LoRA Configuration Determination (spec sec. 2.4, ASSUMPTION reconstruction).

    1. ``d_mem_i``: deepest depth whose ``r_min`` ramp fits device ``i``'s memory.
    2. Candidate deadlines ``T*``: the given ``deadline``, else every ``t_j(d, r_min ramp)``,
       ``d <= d_mem_j``.
    3. For each ``T*`` and device: the deepest ``d <= d_mem`` meeting ``T*`` at ``r_min``
       (at least 1), then the largest rank budget (binary search) whose :func:`rank_ramp` still
       meets ``T*`` and fits memory.
    4. Score ``Phi = T_round / sum_i p_i sum_l w_l r_{i,l}`` with ``w_l = (l + 1) / L`` (a
       rounds-to-target proxy that favours ranks near the output) and ``T_round`` the slowest
       configured device (synchronous round: a device that cannot meet ``T*`` still trains
       at its minimal configuration, so ``T_round >= T*`` then); the smallest ``Phi`` wins,
       ties to the smaller ``T*``. Deterministic.

    Args:
      estimates: per device :class:`CapacityEstimate` (or :class:`DeviceProfile`, converted).
      shape: :class:`ModelShape`.
      r_min: smallest rank of a trained layer.
      r_max: largest rank (the static ``R``).
      batch: samples per step.
      steps: local steps per round.
      deadline: fixed ``T*`` in seconds, or ``None`` to search.
      weights: per-device data weights ``p_i`` (default uniform).
      bytes_per_param: payload dtype size.
      slope: ramp slope (see :func:`rank_ramp`).
      memory_kwargs: passed to :func:`fedlora_jax.devices.client_memory`.

    Returns:
      :class:`LcdPlan`. A device that cannot fit even one layer at ``r_min`` gets depth 0
      and ``feasible=False``; a device that cannot meet ``T*`` gets depth 1 at ``r_min`` and
      ``feasible=False``.
    """
    ests = [estimate_from_profile(e) if isinstance(e, DeviceProfile) else e for e in estimates]
    if not ests:
        raise ValueError("estimates is empty")
    L = shape.num_layers
    _check_lrd(L, 0, r_min, r_max)
    p = np.ones(len(ests)) if weights is None else np.asarray(weights, np.float64)
    if p.shape != (len(ests),) or np.any(p < 0):
        raise ValueError(f"weights must be {len(ests)} non-negative numbers, got {weights!r}")
    kw = dict(batch=batch, steps=steps, bytes_per_param=bytes_per_param,
              memory_kwargs=memory_kwargs)
    cost = {}

    def cost_of(i, d, budget):
        key = (i, d, budget)
        if key not in cost:
            r = rank_ramp(L, d, budget, r_min, r_max, slope=slope)
            cost[key] = (r, *config_cost(ests[i], shape, r, d, **kw))
        return cost[key]

    d_mem = []
    for i, e in enumerate(ests):
        fit = [d for d in range(1, L + 1) if cost_of(i, d, d * r_min)[2] <= e.memory_bytes]
        d_mem.append(max(fit) if fit else 0)
    if deadline is not None:
        cands = [float(deadline)]
    else:
        cands = sorted({cost_of(i, d, d * r_min)[1] for i in range(len(ests))
                        for d in range(1, d_mem[i] + 1)})
        if not cands:
            cands = [float("inf")]
    wl = (np.arange(L) + 1.0) / L
    best = None
    for t_star in cands:
        configs = []
        for i, e in enumerate(ests):
            if d_mem[i] == 0:
                r, t, m = cost_of(i, 1, r_min)
                configs.append(LoraConfig(0, np.zeros(L, np.int64), 0.0, m, False))
                continue
            ok_d = [d for d in range(1, d_mem[i] + 1) if cost_of(i, d, d * r_min)[1] <= t_star]
            d = max(ok_d) if ok_d else 1
            ok = lambda b, i=i, d=d: (cost_of(i, d, b)[1] <= t_star
                                      and cost_of(i, d, b)[2] <= ests[i].memory_bytes)
            lo, hi = d * r_min, d * r_max
            if ok(lo):
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if ok(mid):
                        lo = mid
                    else:
                        hi = mid - 1
            r, t, m = cost_of(i, d, lo)
            configs.append(LoraConfig(d, r, t, m, bool(t <= t_star and m <= e.memory_bytes)))
        util = float(sum(p[i] * np.dot(wl, c.ranks) for i, c in enumerate(configs)))
        round_s = max([c.time_s for c in configs if c.depth > 0], default=0.0)
        score = round_s / util if util > 0 else float("inf")
        if best is None or score < best.score:
            best = LcdPlan(configs, t_star, score)
    return best


def replan(estimates: Sequence[CapacityEstimate], measurements: Sequence[Measurement | None],
           shape: ModelShape, *, rho: float = 0.8, **lcd_kwargs):
    """Update the estimates from measured client times (EMA, ``rho``) and re-run :func:`lcd_plan`.

    ``measurements[i]`` is ``None`` for a device that did not report this round.

    Returns:
      ``(new_estimates, plan)``.
    """
    if len(measurements) != len(estimates):
        raise ValueError(f"got {len(measurements)} measurements for {len(estimates)} estimates")
    new = [e if m is None else update_estimate(e, m, rho=rho)
           for e, m in zip(estimates, measurements, strict=True)]
    return new, lcd_plan(new, shape, **lcd_kwargs)
