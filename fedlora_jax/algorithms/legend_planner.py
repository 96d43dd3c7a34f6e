"""Host-side LEGEND planner: per-device capacity estimates -> LCD plan -> per-client layer ranks.

Wraps :func:`fedlora_jax.algorithms.legend.lcd_plan` / :func:`replan` for the driver: one
estimate per *device profile* (clients of the same profile share it), re-planned after every
round from the measured (here: simulated by the cost model) client times and bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora_jax.algorithms import legend
from fedlora_jax.devices import DeviceProfile, ModelShape


class LegendPlanner:
    """LEGEND's configurator in the driver loop.

    Args:
      profiles: the device profiles of the mix (one estimate each).
      client_devices: ``[K]`` profile index of every client.
      shape: the model's :class:`ModelShape`.
      r_max, r_min: rank bounds per trained layer.
      batch, steps: local work per round (cost model).
      deadline_s: fixed round deadline ``T*`` or ``None`` (LCD searches it).
      rho: EMA factor of the capacity estimates.
    """

    def __init__(self, profiles: Sequence[DeviceProfile], client_devices: np.ndarray, shape: ModelShape, *,
                 r_max: int, r_min: int, batch: int, steps: int, deadline_s: float | None = None,
                 rho: float = 0.8):
        self.profiles = list(profiles)
        self.client_devices = np.asarray(client_devices)
        self.shape = shape
        self.kw = dict(r_min=r_min, r_max=r_max, batch=batch, steps=steps, deadline=deadline_s)
        self.rho = rho
        self.estimates = [legend.estimate_from_profile(p) for p in self.profiles]
        self.plan = legend.lcd_plan(self.estimates, shape, **self.kw)

    def layer_ranks(self, client_ids: np.ndarray) -> np.ndarray:
        """``[C, L]`` ranks per layer for the given clients (0 = no adapter in that layer)."""
        per_device = np.stack([np.asarray(c.ranks, np.int32) for c in self.plan.configs])
        return per_device[self.client_devices[np.asarray(client_ids)]]

    def observe(self, client_ids: np.ndarray, metrics: dict) -> None:
        """Fold measured client times into the estimates (mean per device) and re-plan."""
        t = np.asarray(metrics["client_time_s"], np.float64)
        flops = np.asarray(metrics["client_flops"], np.float64)
        nbytes = np.asarray(metrics["client_bytes"], np.float64)
        devs = self.client_devices[np.asarray(client_ids)]
        measurements = []
        for d, est in enumerate(self.estimates):
            sel = devs == d
            if not np.any(sel):
                measurements.append(None)
                continue
            comp_s = flops[sel] / est.flops_per_s
            comm_s = np.maximum(t[sel] - comp_s, 1e-9)
            measurements.append(legend.Measurement(flops=float(flops[sel].mean()), compute_s=float(comp_s.mean()),
                                                   bytes_up=float(nbytes[sel].mean() / 2),
                                                   up_s=float(comm_s.mean() / 2),
                                                   bytes_down=float(nbytes[sel].mean() / 2),
                                                   down_s=float(comm_s.mean() / 2)))
        self.estimates, self.plan = legend.replan(self.estimates, measurements, self.shape, rho=self.rho, **self.kw)

    def state_dict(self) -> dict:
        return {"estimates": [e._asdict() for e in self.estimates]}

    def load_state_dict(self, d: dict) -> None:
        self.estimates = [legend.CapacityEstimate(**e) for e in d["estimates"]]
        self.plan = legend.lcd_plan(self.estimates, self.shape, **self.kw)
