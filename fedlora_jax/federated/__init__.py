"""The federated round: client specs, client update, one-jit round, sharding helpers, memory,
gradients through whole rounds (:mod:`~fedlora_jax.federated.hypergrad`) and the round across
processes / hosts (:mod:`~fedlora_jax.federated.multiprocess`). The server half of a round
(distribute, screen, aggregate, per-client state, base fold) is
:mod:`~fedlora_jax.federated.server`, shared by the round and the Flower deployment."""

from fedlora_jax.federated import multiprocess, server
from fedlora_jax.federated.hypergrad import RoundInputs, run_rounds, with_client_weights
from fedlora_jax.federated.memory import (
    MemoryBudgetError,
    MemoryEstimate,
    check_population_memory,
    choose_chunk_size,
    cpu_cache_chunk_cap,
    device_memory_bytes,
    estimate_round_memory,
)
from fedlora_jax.federated.multiprocess import DistributedRound, global_client_mesh
from fedlora_jax.federated.round import (
    ClientOutput,
    RoundFn,
    RoundSettings,
    Task,
    check_round_inputs,
    client_update,
    init_server_state,
    make_round,
    population_state_bytes,
    round_key,
)
from fedlora_jax.federated.server import (
    Screened,
    ServerUpdate,
    check_hyper,
    client_start,
    distribute_clients,
    effective_base,
    gather_clients,
    scatter_clients,
    screen,
    server_round_update,
)
from fedlora_jax.federated.sharding import client_mesh, shard_base
from fedlora_jax.federated.spec import ClientSpec, ServerHyper, ServerState, make_spec, num_clients, pad_clients

__all__ = [
    "ClientOutput",
    "ClientSpec",
    "DistributedRound",
    "MemoryBudgetError",
    "MemoryEstimate",
    "RoundFn",
    "RoundInputs",
    "RoundSettings",
    "Screened",
    "ServerHyper",
    "ServerState",
    "ServerUpdate",
    "Task",
    "check_population_memory",
    "choose_chunk_size",
    "check_hyper",
    "check_round_inputs",
    "client_mesh",
    "client_start",
    "client_update",
    "cpu_cache_chunk_cap",
    "device_memory_bytes",
    "distribute_clients",
    "effective_base",
    "estimate_round_memory",
    "gather_clients",
    "global_client_mesh",
    "init_server_state",
    "make_round",
    "make_spec",
    "multiprocess",
    "num_clients",
    "pad_clients",
    "population_state_bytes",
    "round_key",
    "run_rounds",
    "scatter_clients",
    "screen",
    "server",
    "server_round_update",
    "shard_base",
    "with_client_weights",
]
