"""LEGEND (Liu et al., arXiv 2412.20004) as an algorithm: the server re-plans every device's LoRA
depth and rank ramp each round with the LCD planner (:mod:`fedlora_jax.algorithms.legend_planner`)
from capacity estimates that the devices' reported times keep up to date.

The planner's names (:func:`lcd_plan`, :func:`rank_ramp`, :class:`CapacityEstimate`, ...) are
re-exported here, so ``fedlora_jax.algorithms.legend.lcd_plan`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientPlan, prefix_plan_masks
from fedlora_jax.algorithms.legend_planner import (
    PLACEMENTS,
    CapacityEstimate,
    LcdPlan,
    LoraConfig,
    Measurement,
    check_deadline,
    check_placement,
    config_cost,
    deadline_between,
    depth_mask,
    estimate_from_profile,
    is_intermediate,
    lcd_plan,
    measurements_from_reports,
    mirror_to_bottom,
    rank_ramp,
    replan,
    update_estimate,
)
from fedlora_jax.devices import DeviceProfile

__all__ = [
    "CapacityEstimate",
    "LcdPlan",
    "LegendState",
    "LoraConfig",
    "Measurement",
    "PLACEMENTS",
    "build",
    "config_cost",
    "deadline_between",
    "depth_mask",
    "estimate_from_profile",
    "is_intermediate",
    "lcd_plan",
    "measurements_from_reports",
    "mirror_to_bottom",
    "rank_ramp",
    "replan",
    "update_estimate",
]


class LegendState(NamedTuple):
    """LEGEND's server state: the capacity estimate of every device type (``[D]`` float32 each).

    Attributes:
      flops_per_s: sustained FLOP/s.
      uplink_bps: uplink bits/s.
      downlink_bps: downlink bits/s.
    """

    flops_per_s: Any
    uplink_bps: Any
    downlink_bps: Any


def _state_from(estimates: Sequence[CapacityEstimate]) -> LegendState:
    col = lambda f: jnp.asarray(np.array([getattr(e, f) for e in estimates], np.float32))
    return LegendState(col("flops_per_s"), col("uplink_bps"), col("downlink_bps"))


def _estimates_of(state: LegendState, profiles: Sequence[DeviceProfile]) -> list[CapacityEstimate]:
    f, u, d = (np.asarray(x, np.float64) for x in state)
    return [CapacityEstimate(p.name, float(f[i]), float(u[i]), float(d[i]), p.memory_bytes)
            for i, p in enumerate(profiles)]


def build(ctx: AlgoContext, *, r_min: int = 1, rho: float = 0.8, placement: str = "top",
          deadline: str | float | None = None, slope: int = 1) -> Algorithm:
    """LEGEND (Liu et al., arXiv 2412.20004) as an :class:`~fedlora_jax.algorithms.Algorithm`.

    Each round the server runs :func:`lcd_plan` on its capacity estimates of the device types:
    every device gets a LoRA depth (its top ``d`` layers) and a rank ramp rising toward the
    output; its clients train exactly that (masks ``[C, R]`` per module, depth ``[C, L]``, no
    backward below the depth). Aggregation: the per-slot mean over the clients that trained
    the slot (spec 2.4, the algebra of replication padding's REP-MEAN). After the round the
    devices' reported times (:class:`~fedlora_jax.algorithms.RoundReport`: measured, or from
    the simulated devices whose true speed drifts, ``ExperimentConfig.device_drift`` /
    ``device_noise``) update the estimates by EMA (``rho``): :attr:`Algorithm.observe`.

    Args:
      ctx: the algorithm context (needs ``device_profiles`` and ``model_shape``).
      r_min: smallest rank of a trained layer.
      rho: EMA factor of the capacity estimates (1 = never update).
      placement: ``"top"`` (LEGEND) or ``"bottom"`` (the control: the same depths and ranks
        mirrored onto the bottom layers, same payload; see :func:`lcd_plan`).
      deadline: the configurator's ``T*``: ``None`` = the experiment's ``deadline_s`` if set,
        else searched each round; a float (seconds); or ``"between"`` = :func:`deadline_between`
        on the initial estimates (a fixed ``T*`` at which the most device types get
        intermediate configurations).
      slope: ramp slope (:func:`rank_ramp`).
    """
    if not ctx.device_profiles or ctx.model_shape is None:
        raise ValueError("legend needs the device profiles and the model shape in its AlgoContext")
    if not isinstance(r_min, int) or not 1 <= r_min <= ctx.r_max:
        raise ValueError(f"legend option r_min must be an int in [1, r_max={ctx.r_max}], got {r_min!r}")
    if not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"legend option rho must be in [0, 1], got {rho!r}")
    check_placement(placement)
    profiles = list(ctx.device_profiles)
    kw = dict(r_min=r_min, r_max=ctx.r_max, batch=ctx.batch_size, steps=ctx.local_steps, slope=slope)
    initial = [estimate_from_profile(p) for p in profiles]
    if deadline == "between":
        t_star = deadline_between(initial, ctx.model_shape, **kw)
    elif deadline is None:
        t_star = ctx.deadline_s
    elif isinstance(deadline, (int, float)) and not isinstance(deadline, bool):
        t_star = check_deadline("legend option deadline", float(deadline))
    else:
        raise ValueError(f"legend option deadline must be None, a number of seconds or 'between', got {deadline!r}")
    aggregator = agg_lib.replication_padding(**ctx.aggregator_options)
    keys, r_max, num_devices = ctx.keys, ctx.r_max, len(profiles)
    cache: dict = {}

    def plan_for(algo_state) -> LcdPlan:
        ests = _estimates_of(algo_state, profiles)
        key = tuple((e.flops_per_s, e.uplink_bps, e.downlink_bps) for e in ests)
        if key not in cache:
            cache.clear()
            cache[key] = lcd_plan(ests, ctx.model_shape, deadline=t_star, placement=placement, **kw)
        return cache[key]

    def plan(state, client_ids, round_idx):
        del round_idx
        per_device = np.stack([np.asarray(c.ranks, np.int64) for c in plan_for(state.algo).configs])  # [D, L]
        layer_ranks = per_device[ctx.client_devices[np.asarray(client_ids)]]                         # [C, L]
        masks = {k: prefix_plan_masks(layer_ranks[:, ctx.layer_of_key[k]], r_max) for k in keys}
        return ClientPlan(masks, masks, (layer_ranks > 0).astype(np.float32))

    def observe(algo_state, report):
        ok = np.asarray(report.participated, bool)
        meas = measurements_from_reports(report.device_ids[ok], report.flops[ok], report.compute_s[ok],
                                         report.bytes_up[ok], report.up_s[ok], report.bytes_down[ok],
                                         report.down_s[ok], num_devices)
        ests = _estimates_of(algo_state, profiles)
        return _state_from([e if m is None else update_estimate(e, m, rho=float(rho))
                            for e, m in zip(ests, meas, strict=True)])

    options = dict(r_min=r_min, rho=rho, placement=placement, deadline=t_star, slope=slope)
    return Algorithm(name="legend", aggregator=aggregator, plan=plan, init=lambda lora: _state_from(initial),
                     observe=observe, options=options)
