"""Device profiles and the client cost model (FLOPs, memory, bytes, time, energy).

See :mod:`fedlora_jax.devices.profiles`, :mod:`fedlora_jax.devices.cost` and
:mod:`fedlora_jax.devices.simulate` (true device speed and measured times).
"""

from fedlora_jax.devices.cost import (
    ClientCost,
    ClientTime,
    ModelShape,
    bytes_down,
    bytes_up,
    client_cost,
    client_energy,
    client_flops,
    client_memory,
    client_time,
    lora_params,
    payload_bytes,
    ranks_from_masks,
    round_time,
)
from fedlora_jax.devices.profiles import (
    PROFILES,
    DeviceArrays,
    DeviceProfile,
    get_profile,
    load_profiles,
    profile_from_dict,
    stack_profiles,
    take_devices,
)
from fedlora_jax.devices.simulate import MeasuredTimes, measure_round, true_speed_factor

__all__ = [
    "PROFILES",
    "ClientCost",
    "ClientTime",
    "DeviceArrays",
    "DeviceProfile",
    "MeasuredTimes",
    "ModelShape",
    "bytes_down",
    "bytes_up",
    "client_cost",
    "client_energy",
    "client_flops",
    "client_memory",
    "client_time",
    "get_profile",
    "load_profiles",
    "lora_params",
    "measure_round",
    "payload_bytes",
    "profile_from_dict",
    "ranks_from_masks",
    "round_time",
    "stack_profiles",
    "take_devices",
    "true_speed_factor",
]
