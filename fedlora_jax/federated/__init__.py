"""The federated round: client specs, client update, one-jit round, sharding helpers."""

from fedlora_jax.federated.round import (
    ClientOutput,
    RoundFn,
    RoundSettings,
    Task,
    client_update,
    effective_base,
    init_server_state,
    make_round,
    round_key,
)
from fedlora_jax.federated.sharding import client_mesh, shard_base
from fedlora_jax.federated.spec import ClientSpec, ServerState, make_spec, num_clients, pad_clients

__all__ = [
    "ClientOutput",
    "ClientSpec",
    "RoundFn",
    "RoundSettings",
    "ServerState",
    "Task",
    "client_mesh",
    "client_update",
    "effective_base",
    "init_server_state",
    "make_round",
    "make_spec",
    "num_clients",
    "pad_clients",
    "round_key",
    "shard_base",
]

from fedlora_jax.federated.memory import (  # noqa: E402
    MemoryBudgetError,
    MemoryEstimate,
    choose_chunk_size,
    cpu_cache_chunk_cap,
    device_memory_bytes,
    estimate_round_memory,
)

__all__ += [
    "MemoryBudgetError",
    "MemoryEstimate",
    "choose_chunk_size",
    "cpu_cache_chunk_cap",
    "device_memory_bytes",
    "estimate_round_memory",
]
