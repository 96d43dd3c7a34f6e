"""The device stage of a simulated round: what each sampled client's device would spend (FLOPs,
time, energy) at its true, drifting speed, and the report an algorithm may learn from (LEGEND
re-plans from it). Host NumPy, after the round's spec is known and before the round runs."""

from __future__ import annotations

import numpy as np

from fedlora_jax import devices as dev_lib
from fedlora_jax.algorithms import RoundReport


def simulate_devices(setup, spec, client_ids: np.ndarray, round_idx: int, bytes_up, bytes_down):
    """The device stage of a round: FLOPs from the cost model, the times the devices take at
    their *true* speed (``devices.true_speed_factor``: drift and noise per client, seeded),
    energy, and the :class:`RoundReport` an algorithm may learn from.

    Returns ``(flops [C], times: MeasuredTimes, energy [C], report)``.
    """
    cfg = setup.cfg
    ranks = dev_lib.ranks_from_masks({k: np.asarray(v) for k, v in spec.update_masks.items()}, setup.model_shape)
    per_step = dev_lib.client_flops(np.asarray(ranks), np.asarray(spec.grad_cut), setup.model_shape,
                                    batch=cfg.batch_size, steps=1)
    flops = np.asarray(per_step, np.float64) * np.asarray(spec.num_steps, np.float64)
    device_ids = setup.ctx.client_devices[client_ids]
    devs = dev_lib.take_devices(setup.device_table, device_ids)
    speed = dev_lib.true_speed_factor(client_ids, round_idx, seed=cfg.seed, drift=cfg.device_drift,
                                      noise=cfg.device_noise, tag=0)
    link = dev_lib.true_speed_factor(client_ids, round_idx, seed=cfg.seed, drift=cfg.device_drift,
                                     noise=cfg.device_noise, tag=1)
    times = dev_lib.measure_round(flops, bytes_up, bytes_down, devs, speed, link_factors=link)
    energy = np.asarray(dev_lib.client_energy(dev_lib.ClientTime(times.compute_s, times.up_s + times.down_s,
                                                                 times.total_s), devs), np.float64)
    report = RoundReport(np.asarray(client_ids), np.asarray(device_ids), np.asarray(spec.weight) > 0, flops,
                         times.compute_s, np.asarray(bytes_up), times.up_s, np.asarray(bytes_down), times.down_s)
    return flops, times, energy, report
