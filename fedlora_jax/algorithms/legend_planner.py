"""LEGEND's planner: capacity estimation and the greedy LoRA Configuration Determination (LCD).

The algorithm that runs it each round is :mod:`fedlora_jax.algorithms.legend`; this module is
its configurator alone (no JAX, no algorithm interface), usable on its own to size depths and
ranks for a set of devices.

Host-side NumPy/Python, run by the server between rounds (``shared/papers/fedara_legend.md``
sec. 2.3-2.5; everything here is the spec's ASSUMPTION-level reconstruction). A device trains
LoRA in its top ``d`` layers (``cut = L - d``) with per-layer ranks non-decreasing toward the
output; every adapted module of a layer gets that layer's rank. Costs come from
:mod:`fedlora_jax.devices` with the *estimated* capacities.

Placement (``placement=`` of :func:`depth_mask`, :func:`rank_ramp`, :func:`config_cost`,
:func:`lcd_plan`): ``"top"`` is LEGEND (adapters on the top ``d`` layers, ranks rising toward
the output); ``"bottom"`` is the control the paper's claim needs: the same depth and the same
ranks mirrored onto layers ``0 .. d - 1`` (:func:`mirror_to_bottom`), hence the same payload
but a backward pass through the whole model.

Capacity estimation needs measured times that do not come from the estimate itself:
:func:`fedlora_jax.devices.true_speed_factor` / :func:`fedlora_jax.devices.measure_round`
simulate them, :func:`measurements_from_reports` turns client reports into per-device
:class:`Measurement` for :func:`update_estimate` / :func:`replan`.

Layers are 0-based: layer ``L - 1`` is closest to the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedlora_jax.devices import DeviceProfile, ModelShape, client_flops, client_memory, payload_bytes

PLACEMENTS = ("top", "bottom")


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


def check_placement(placement: str) -> None:
    """``ValueError`` unless ``placement`` is one of :data:`PLACEMENTS`."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} ('top' = LEGEND, 'bottom' = the "
                         f"bottom-layer control), got {placement!r}")


def depth_mask(L: int, d: int, *, placement: str = "top") -> np.ndarray:
    """``[L]`` bool: True for the top ``d`` layers ``L - d .. L - 1`` (``"bottom"``: ``0 .. d - 1``)."""
    _check_lrd(L, d)
    check_placement(placement)
    return np.arange(L) >= L - d if placement == "top" else np.arange(L) < d


def mirror_to_bottom(layer_ranks) -> np.ndarray:
    """Mirror a top placement onto the bottom layers: ``[..., L] -> [..., L]``, ``out[..., l] = in[..., L-1-l]``.

    A LEGEND plan (adapters on layers ``L - d .. L - 1``, ranks non-decreasing toward the
    output) becomes the control with the same depth and the same multiset of ranks on layers
    ``0 .. d - 1``, the largest ranks at the bottom (layer 0). The payload
    (:func:`fedlora_jax.devices.payload_bytes`) is unchanged because every layer adapts the
    same modules.

    Raises:
      ValueError: if a rank is negative or not an integer, or a row's adapted layers are not
        a top block (a layer with rank 0 above one with rank > 0); mirroring such a row (for
        example a plan already mirrored) is refused rather than silently flipped back.
    """
    r = np.asarray(layer_ranks)
    if r.ndim < 1 or r.shape[-1] < 1:
        raise ValueError(f"layer_ranks must have shape [..., L] with L >= 1, got {r.shape}")
    if not (np.issubdtype(r.dtype, np.integer) or np.all(r == np.round(r))) or np.any(r < 0):
        raise ValueError(f"layer_ranks must be non-negative integers, got {r!r}")
    on = r > 0
    if np.any(on[..., :-1] & ~on[..., 1:]):
        bad = np.argwhere(np.any(on[..., :-1] & ~on[..., 1:], axis=-1))
        raise ValueError(f"layer_ranks must be a top placement (adapted layers L-d..L-1, zeros below); "
                         f"row(s) {bad.tolist()[:5]} are not: {r!r}")
    return np.flip(r, axis=-1).copy()


def rank_ramp(L: int, d: int, budget: int, r_min: int, r_max: int, *, slope: int = 1,
              placement: str = "top") -> np.ndarray:
    """Per-layer ranks ``[L]`` non-decreasing toward the output, summing to the budget.

    The top ``d`` layers get a linear ramp ``clip(top - slope * k, r_min, r_max)`` (``k`` =
    distance from the output) with the largest ``top`` that fits ``budget``; the remainder
    goes one rank each to the layers nearest the output that can take it without breaking the
    order. ``budget`` is clipped to ``[d r_min, d r_max]`` (so the sum may exceed a budget
    below ``d r_min``). Layers below the depth get 0.

    ``placement="bottom"``: the same ranks mirrored onto layers ``0 .. d - 1``
    (:func:`mirror_to_bottom`; non-increasing toward the output).
    """
    _check_lrd(L, d, r_min, r_max)
    check_placement(placement)
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
    return out if placement == "top" else mirror_to_bottom(out)


def is_intermediate(layer_ranks, r_min: int, r_max: int) -> bool:
    """True for a configuration between the minimal and the full one.

    With ``d`` = adapted layers (rank > 0) of ``layer_ranks [L]`` and ``s`` their rank sum:
    ``1 < d < L`` or ``d r_min < s < d r_max``. False for no adapter, for one layer at
    ``r_min``, for all layers at ``r_max``, and for ``d`` layers all at ``r_min`` or all at
    ``r_max`` with ``d`` in ``{1, L}``.
    """
    r = np.asarray(layer_ranks)
    if r.ndim != 1:
        raise ValueError(f"layer_ranks must be [L], got shape {r.shape}")
    d, s, L = int(np.sum(r > 0)), int(np.sum(r)), r.shape[0]
    return d > 0 and (1 < d < L or d * r_min < s < d * r_max)


def config_cost(est: CapacityEstimate, shape: ModelShape, layer_ranks: np.ndarray, depth: int, *,
                batch: int, steps: int, bytes_per_param: int = 4,
                memory_kwargs: Mapping | None = None, placement: str = "top") -> tuple[float, float]:
    """Estimated ``(time_s, memory_bytes)`` of one device for ``(depth, layer_ranks [L])``.

    The backward pass reaches the lowest adapted layer: ``cut = L - depth`` for ``"top"``,
    ``cut = 0`` for ``"bottom"`` (any depth > 0: the whole model).
    """
    check_placement(placement)
    ranks = np.repeat(np.asarray(layer_ranks)[:, None], len(shape.modules), axis=1)
    cut = shape.num_layers - depth if placement == "top" or depth == 0 else 0
    fl = float(client_flops(ranks, cut, shape, batch=batch, steps=steps))
    mem = float(client_memory(ranks, cut, shape, batch=batch, **dict(memory_kwargs or {})))
    by = float(payload_bytes(ranks, shape, bytes_per_param=bytes_per_param))
    t = fl / est.flops_per_s + 8.0 * by / est.uplink_bps + 8.0 * by / est.downlink_bps
    return t, mem


class _Greedy:
    """The LCD greedy's per-device step with a shared cost cache (steps 1 and 3 of :func:`lcd_plan`)."""

    def __init__(self, ests, shape, *, r_min, r_max, slope, kw):
        self.ests, self.shape, self.r_min, self.r_max, self.slope, self.kw = ests, shape, r_min, r_max, slope, kw
        self.L = shape.num_layers
        self.cache = {}
        self.d_mem = []
        for i, e in enumerate(ests):
            fit = [d for d in range(1, self.L + 1) if self.cost(i, d, d * r_min)[2] <= e.memory_bytes]
            self.d_mem.append(max(fit) if fit else 0)

    def cost(self, i, d, budget):
        """``(ranks [L], time_s, memory_bytes)`` of device ``i`` at depth ``d`` and rank ``budget``."""
        key = (i, d, budget)
        if key not in self.cache:
            r = rank_ramp(self.L, d, budget, self.r_min, self.r_max, slope=self.slope)
            self.cache[key] = (r, *config_cost(self.ests[i], self.shape, r, d, **self.kw))
        return self.cache[key]

    def configs_at(self, t_star: float) -> list:
        configs = []
        for i, e in enumerate(self.ests):
            if self.d_mem[i] == 0:
                _, _, m = self.cost(i, 1, self.r_min)
                configs.append(LoraConfig(0, np.zeros(self.L, np.int64), 0.0, m, False))
                continue
            ok_d = [d for d in range(1, self.d_mem[i] + 1) if self.cost(i, d, d * self.r_min)[1] <= t_star]
            d = max(ok_d) if ok_d else 1
            ok = lambda b, i=i, d=d: (self.cost(i, d, b)[1] <= t_star
                                      and self.cost(i, d, b)[2] <= self.ests[i].memory_bytes)
            lo, hi = d * self.r_min, d * self.r_max
            if ok(lo):
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if ok(mid):
                        lo = mid
                    else:
                        hi = mid - 1
            r, t, m = self.cost(i, d, lo)
            configs.append(LoraConfig(d, r, t, m, bool(t <= t_star and m <= e.memory_bytes)))
        return configs


def _score(configs, p, wl) -> float:
    util = float(sum(p[i] * np.dot(wl, c.ranks) for i, c in enumerate(configs)))
    round_s = max([c.time_s for c in configs if c.depth > 0], default=0.0)
    return round_s / util if util > 0 else float("inf")


def _setup(estimates, shape, r_min, r_max, batch, steps, bytes_per_param, slope, memory_kwargs):
    ests = [estimate_from_profile(e) if isinstance(e, DeviceProfile) else e for e in estimates]
    if not ests:
        raise ValueError("estimates is empty")
    _check_lrd(shape.num_layers, 0, r_min, r_max)
    kw = dict(batch=batch, steps=steps, bytes_per_param=bytes_per_param, memory_kwargs=memory_kwargs)
    return ests, kw, _Greedy(ests, shape, r_min=r_min, r_max=r_max, slope=slope, kw=kw)


def check_deadline(name: str, v) -> float:
    """``v`` as float seconds; ``ValueError`` naming ``name`` unless it is a number > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
        raise ValueError(f"{name} must be a number > 0 (seconds; inf allowed), got {v!r}")
    return float(v)


def lcd_plan(estimates: Sequence[CapacityEstimate | DeviceProfile], shape: ModelShape, *,
             r_min: int, r_max: int, batch: int, steps: int, deadline: float | None = None,
             weights: Sequence[float] | None = None, bytes_per_param: int = 4, slope: int = 1,
             memory_kwargs: Mapping | None = None, placement: str = "top") -> LcdPlan:
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
    5. ``placement="bottom"`` (the control): the plan of steps 1-4 with every device's ranks
       mirrored onto layers ``0 .. d - 1`` (:func:`mirror_to_bottom`): same ``T*``, depths and
       payload bytes; times and memory re-estimated with the backward pass through the whole
       model, ``feasible`` re-checked against ``T*`` and memory (the control usually misses
       ``T*``: that is its extra cost), score recomputed with the same formula.

    Why the searched plan collapses on the experiment's mix (``experiments/configs/legend.py``:
    MiniLM-L6, ``T = 32``, batch 8 x 4 steps, query/value, ``r_min`` 1, ``r_max`` 8; AGX Orin,
    Orin Nano, Snapdragon phone, Raspberry Pi 5). It is a property of the cost model and the
    mix, not a bug of the greedy (the binary search is exact: time and memory are monotone in
    the rank budget). (a) The three GPU-class devices are communication-bound (compute is 2 %,
    10 % and 51 % of their full-config time): one rank on one layer is ~3.4 ms of Wi-Fi/5G
    time, so depth and rank do move their time, and their full config (6 layers at rank 8)
    takes 0.17, 0.18 and 0.29 s. (b) The Pi is compute-bound: the frozen forward through all
    6 layers, which no configuration avoids, already costs ~0.72 s; each trained layer adds
    ~0.12 s of backward and the adapter FLOPs are < 1 % of the total, so the rank barely
    changes its time; its minimal config takes 0.84 s and its full one 1.63 s. (c) A
    synchronous round therefore lasts >= 0.84 s whenever the Pi trains, 2.9x the slowest
    other device's *full* time: at every candidate ``T*`` the other three are capped by
    ``L`` and ``r_max``, not by ``T*``, and the score (shorter rounds, more rank near the
    output) rightly picks ``T*`` = the Pi's minimal time: FedIT for 3 of 4 device types, the
    Pi at depth 1, rank 1. Two or more intermediate device types need a fixed ``T*`` below
    the fast devices' full times, which the Pi cannot meet at all: ``T*`` in [0.093, 0.171) s
    gives three (Orin, Nano, phone), [0.171, 0.185) two (Nano, phone), [0.185, 0.293) one,
    [0.293, 0.848) none, and parts of [0.848, 1.627) the Pi alone.
    :func:`deadline_between` picks such a ``T*``.

    Args:
      estimates: per device :class:`CapacityEstimate` (or :class:`DeviceProfile`, converted).
      shape: :class:`ModelShape`.
      r_min: smallest rank of a trained layer.
      r_max: largest rank (the static ``R``).
      batch: samples per step.
      steps: local steps per round.
      deadline: fixed ``T*`` in seconds (``> 0``; ``inf`` = every device at its deepest,
        largest memory-fitting configuration), or ``None`` to search.
      weights: per-device data weights ``p_i`` (default uniform).
      bytes_per_param: payload dtype size.
      slope: ramp slope (see :func:`rank_ramp`).
      memory_kwargs: passed to :func:`fedlora_jax.devices.client_memory`.
      placement: ``"top"`` (LEGEND) or ``"bottom"`` (the control, step 5).

    Returns:
      :class:`LcdPlan`. A device that cannot fit even one layer at ``r_min`` gets depth 0
      and ``feasible=False``; a device that cannot meet ``T*`` gets depth 1 at ``r_min`` and
      ``feasible=False``.
    """
    check_placement(placement)
    ests, kw, greedy = _setup(estimates, shape, r_min, r_max, batch, steps, bytes_per_param, slope,
                              memory_kwargs)
    L = shape.num_layers
    p = np.ones(len(ests)) if weights is None else np.asarray(weights, np.float64)
    if p.shape != (len(ests),) or np.any(p < 0):
        raise ValueError(f"weights must be {len(ests)} non-negative numbers, got {weights!r}")
    if deadline is not None:
        cands = [check_deadline("deadline", deadline)]
    else:
        cands = sorted({greedy.cost(i, d, d * r_min)[1] for i in range(len(ests))
                        for d in range(1, greedy.d_mem[i] + 1)})
        if not cands:
            cands = [float("inf")]
    wl = (np.arange(L) + 1.0) / L
    best = None
    for t_star in cands:
        configs = greedy.configs_at(t_star)
        score = _score(configs, p, wl)
        if best is None or score < best.score:
            best = LcdPlan(configs, t_star, score)
    if placement == "bottom":
        configs = []
        for e, c in zip(ests, best.configs, strict=True):
            if c.depth == 0:
                configs.append(c)
                continue
            r = mirror_to_bottom(c.ranks)
            t, m = config_cost(e, shape, r, c.depth, placement="bottom", **kw)
            configs.append(LoraConfig(c.depth, r, t, m, bool(t <= best.deadline and m <= e.memory_bytes)))
        best = LcdPlan(configs, best.deadline, _score(configs, p, wl))
    return best


def deadline_between(estimates: Sequence[CapacityEstimate | DeviceProfile], shape: ModelShape, *,
                     r_min: int, r_max: int, batch: int, steps: int, quantile: float = 0.5,
                     bounds: tuple[float, float] | None = None, bytes_per_param: int = 4, slope: int = 1,
                     memory_kwargs: Mapping | None = None) -> float:
    """A fixed deadline ``T*`` at which the most device types get intermediate LCD configurations.

    Needed because the searched ``T*`` collapses on realistic mixes (see :func:`lcd_plan`:
    when the slowest device's *minimal* time exceeds the others' *full* times, every searched
    ``T*`` saturates the others). Within ``bounds`` (default: the fastest and the slowest
    device's full-config times, i.e. their times at ``deadline=inf``), the window is cut at
    every time where some device's configuration class can change (``t_i(d, b)`` for
    ``b`` in ``{d r_min, d r_min + 1, d r_max}``, ``d <= d_mem_i``); in each piece
    ``[lo, hi)`` the candidate ``lo (hi / lo) ** quantile`` (geometric position) is planned
    with :func:`lcd_plan` and its devices counted with :func:`is_intermediate`.

    ASSUMPTION (not in the paper; the paper's testbed is assumed to have a mix where this is
    not needed): the candidate with the most intermediate devices wins; ties go to the
    widest piece (in log time; the count survives the largest estimate drift), then to the
    smaller ``T*``. Devices that cannot meet the returned ``T*`` train their minimal
    configuration and are flagged ``feasible=False`` by :func:`lcd_plan` (a synchronous round
    waits for them, or the driver drops them at the deadline). The returned ``T*`` may give
    zero intermediate devices when none in the window does (e.g. identical devices).

    Args:
      estimates, shape, r_min, r_max, batch, steps, bytes_per_param, slope, memory_kwargs: as
        in :func:`lcd_plan`.
      quantile: position in ``[0, 1)`` inside the winning piece (0 = its start).
      bounds: ``(lo, hi)`` seconds, ``0 < lo <= hi``, to search instead of the default window.

    Returns:
      ``T*`` in seconds, to pass as ``lcd_plan(..., deadline=T*)``.
    """
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.floating)) \
            or not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    ests, _, greedy = _setup(estimates, shape, r_min, r_max, batch, steps, bytes_per_param, slope,
                             memory_kwargs)
    if bounds is None:
        full = [c.time_s for c in greedy.configs_at(float("inf")) if c.depth > 0]
        if not full:
            raise ValueError("no device fits even one layer at r_min in memory: no deadline to pick")
        lo, hi = min(full), max(full)
    else:
        if len(bounds) != 2:
            raise ValueError(f"bounds must be (lo, hi), got {bounds!r}")
        lo, hi = (check_deadline("bounds", b) for b in bounds)
        if not (lo <= hi and np.isfinite(hi)):
            raise ValueError(f"bounds must satisfy 0 < lo <= hi < inf, got {bounds!r}")
    cuts = set()
    for i in range(len(ests)):
        for d in range(1, greedy.d_mem[i] + 1):
            for b in sorted({d * r_min, min(d * r_min + 1, d * r_max), d * r_max}):
                cuts.add(greedy.cost(i, d, b)[1])
    points = [lo] + sorted(t for t in cuts if lo < t < hi) + [hi]
    pieces = list(zip(points[:-1], points[1:], strict=True)) or [(lo, hi)]
    if hi > lo:
        pieces = [(a, b) for a, b in pieces if b > a]
    best = None
    for a, b in pieces:
        t_star = a * (b / a) ** quantile
        n = sum(is_intermediate(c.ranks, r_min, r_max) for c in greedy.configs_at(t_star))
        key = (-n, -np.log(b / a), t_star)
        if best is None or key < best[0]:
            best = (key, t_star)
    return float(best[1])


def measurements_from_reports(device_of_client, flops, compute_s, bytes_up, up_s, bytes_down, down_s,
                              num_devices: int) -> list:
    """Per-device-type :class:`Measurement` from the clients' reports (mean over its clients).

    Feeds :func:`update_estimate` / :func:`replan` with times a device measured (e.g.
    :func:`fedlora_jax.devices.measure_round`), not times derived from the estimate.

    Args:
      device_of_client: ``[C]`` int device-type index of each reporting client.
      flops: ``[C]`` work done.
      compute_s: ``[C]`` measured compute seconds.
      bytes_up: ``[C]`` uploaded bytes.
      up_s: ``[C]`` measured upload seconds.
      bytes_down: ``[C]`` downloaded bytes.
      down_s: ``[C]`` measured download seconds.
      num_devices: number of device types ``D``.

    Returns:
      ``D`` entries: a :class:`Measurement` of the mean work and mean times of the clients of
      that type (so the EMA sees ``sum work / sum time``), or ``None`` where none reported.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
    dev = np.asarray(device_of_client)
    if dev.ndim != 1 or (dev.size and not np.issubdtype(dev.dtype, np.integer)):
        raise ValueError(f"device_of_client must be a 1-D int array [C], got {dev!r}")
    if dev.size and (dev.min() < 0 or dev.max() >= num_devices):
        raise ValueError(f"device_of_client must lie in [0, num_devices={num_devices}), got {dev!r}")
    cols = {}
    for name, x in (("flops", flops), ("compute_s", compute_s), ("bytes_up", bytes_up), ("up_s", up_s),
                    ("bytes_down", bytes_down), ("down_s", down_s)):
        a = np.asarray(x, np.float64)
        if a.shape != dev.shape:
            raise ValueError(f"{name} must have shape {dev.shape} like device_of_client, got {a.shape}")
        if np.any(~np.isfinite(a) | (a < 0)):
            raise ValueError(f"{name} must be finite and >= 0, got {a!r}")
        cols[name] = a
    out = []
    for d in range(num_devices):
        sel = dev == d
        out.append(Measurement(**{k: float(v[sel].mean()) for k, v in cols.items()}) if np.any(sel) else None)
    return out


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
