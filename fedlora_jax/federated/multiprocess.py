"""Multi-process JAX: one federated round across processes (hosts), the mesh's ``"clients"``
axis spanning them. The path to multi-host GPU and TPU.

Every process runs the same program (SPMD, multi-controller); each builds only its own share
of the sampled clients' batches, and the round is the same :func:`~fedlora_jax.federated.make_round`::

    from fedlora_jax.federated import multiprocess as mp

    mp.initialize("10.0.0.1:8476", num_processes=2, process_id=i)  # or mp.initialize() on a TPU pod
    mesh = mp.global_client_mesh()                # every device of every process on "clients"
    lo, hi = mp.local_client_range(c, mesh)       # positions [lo, hi) of the C clients built here
    batches = mp.client_arrays(local_batches, mesh, num_clients=c)  # leaves [hi-lo, S, B, T] -> [C, ...]
    state, spec, key, base = mp.replicate((state, spec, key, base), mesh)  # same value everywhere
    round_fn = make_round(task, algo, chunk_size=k, mesh=mesh)        # k a multiple of mesh "clients"
    new_state, metrics = mp.to_host(round_fn(state, batches, spec, key, base))  # NumPy, everywhere

or, the same in one call per round, :class:`DistributedRound`. Layout: the devices are ordered
by process, so process ``p`` owns a contiguous block of the ``"clients"`` axis and of the
client positions; ``C`` must be a multiple of the axis size. Inside the round the clients are
regrouped into chunks (``[C] -> [C / k, k]``, ``k`` sharded); XLA moves the rows that change
device (one all-to-all of the batches), which is exact.

Collectives: :func:`to_host` of a non-replicated array, :func:`barrier` and the round itself
are collective: every process must make the same calls in the same order.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedlora_jax.federated.sharding import client_mesh

#: Environment variables the local launcher (``fedlora train --num-processes N``) sets in each
#: child, read by :func:`initialize` when its arguments are not given.
ENV_COORDINATOR = "FEDLORA_COORDINATOR"
ENV_NUM_PROCESSES = "FEDLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDLORA_PROCESS_ID"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={v!r} must be an integer") from err


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = "gloo",
               initialization_timeout: int = 300, local_device_ids=None) -> tuple[int, int]:
    """Join the processes of a multi-process run (``jax.distributed.initialize``).

    Call it first, before anything touches a JAX backend. Arguments left ``None`` come from
    ``FEDLORA_COORDINATOR`` / ``FEDLORA_NUM_PROCESSES`` / ``FEDLORA_PROCESS_ID``; if all are
    still ``None``, JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI).
    ``num_processes == 1`` is a single-process run: nothing is initialized. A second call is a
    no-op.

    Args:
      coordinator_address: ``"HOST:PORT"`` of process 0 (its coordination service listens there).
      num_processes: number of processes ``P``.
      process_id: this process, in ``[0, P)``.
      cpu_collectives: the CPU backend's cross-process collectives (``"gloo"``; set before the
        backend starts, harmless on GPU/TPU), or ``None`` to leave JAX's setting alone.
      initialization_timeout: seconds to wait for every process to join (then JAX raises).
      local_device_ids: restrict this process to these local accelerator ids (e.g. one
        process per GPU).

    Returns:
      ``(jax.process_index(), jax.process_count())``.

    Raises:
      ValueError: a process id outside ``[0, P)``, a missing coordinator for ``P > 1``.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return 0, 1
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("give all of coordinator_address (HOST:PORT), num_processes and process_id, or none "
                         f"of them (cluster auto-detection); got {explicit}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """Whether this is process 0 (the one that writes metrics, checkpoints and summaries)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op with one process). Collective."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_client_mesh(devices=None, *, model: int = 1) -> Mesh:
    """A :func:`~fedlora_jax.federated.client_mesh` over every device of every process,
    ordered by (process, device id), so each process owns a contiguous block of ``"clients"``.

    With ``model > 1`` each ``"model"`` group lies inside one process (its devices talk over
    the fast local links); every process's device count must be a multiple of ``model``.

    Raises:
      ValueError: if a process's device count is not a multiple of ``model``.
    """
    devs = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    counts: dict[int, int] = {}
    for d in devs:
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    bad = {p: n for p, n in counts.items() if model < 1 or n % model}
    if bad:
        raise ValueError(f"model={model} must be >= 1 and divide every process's device count; devices per "
                         f"process: {counts}")
    return client_mesh(devs, model=model)


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Client-stacked leaves ``[C, ...]``: split on ``"clients"``, replicated on any other axis."""
    return NamedSharding(mesh, PartitionSpec("clients"))


def local_client_range(num_clients: int, mesh: Mesh) -> tuple[int, int]:
    """Positions ``[start, stop)`` of the ``C`` clients of a round whose batches this process builds.

    Raises:
      ValueError: if ``C`` is not a multiple of the mesh's ``"clients"`` axis.
    """
    n = mesh.shape["clients"]
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1 or num_clients % n:
        raise ValueError(f"the number of clients of a round ({num_clients!r}) must be a positive multiple of "
                         f"the mesh's 'clients' axis ({n} devices across {jax.process_count()} processes)")
    index = client_sharding(mesh).addressable_devices_indices_map((int(num_clients),))
    rows = sorted({(s[0].start or 0, num_clients if s[0].stop is None else s[0].stop) for s in index.values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:], strict=False)):
        raise ValueError(f"this process's clients are not contiguous on the mesh ({rows}); build the mesh with "
                         "global_client_mesh()")
    return int(start), int(stop)


def client_arrays(local_tree: Any, mesh: Mesh, *, num_clients: int) -> Any:
    """Global ``[C, ...]`` arrays from each process's rows ``[stop - start, ...]`` of
    :func:`local_client_range` (``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: if a leaf's leading axis is not this process's share of the ``C`` clients.
    """
    start, stop = local_client_range(num_clients, mesh)
    sharding = client_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != stop - start:
            raise ValueError(f"a local client leaf has shape {x.shape}; expected [{stop - start}, ...] (clients "
                             f"[{start}, {stop}) of {num_clients} on process {jax.process_index()})")
        return jax.make_array_from_process_local_data(sharding, x, (int(num_clients),) + x.shape[1:])

    return jax.tree.map(put, local_tree)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf (host value, the same on every process) as a global array replicated on ``mesh``.

    Typed PRNG keys stay keys. A leaf already placed on ``mesh`` is kept as it is.
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh:
            return x
        if _is_key(x):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        v = np.asarray(x)
        return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Every array leaf as NumPy, the full global value on every process. Collective where a
    leaf is split across processes (``process_allgather``); replicated leaves are read locally."""
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if _is_key(x):
            return jax.random.wrap_key_data(get(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


class DistributedRound:
    """A round over a multi-process mesh that takes and returns host values.

    ``DistributedRound(round_fn, mesh)(state, local_batches, spec, key, base)`` replicates the
    server state, spec, key and base (the base once: it is cached while the same object is
    passed), assembles the global client batches from this process's rows
    (:func:`local_client_range` of ``C = spec.weight.shape[0]``), runs ``round_fn`` and returns
    ``(state, metrics)`` fetched to the host: the state as local ``jax`` arrays, the metrics as
    NumPy, identical on every process. Collective: every process calls it each round.
    """

    def __init__(self, round_fn, mesh: Mesh):
        self.round_fn, self.mesh = round_fn, mesh
        self._base = (None, None)

    def local_range(self, num_clients: int) -> tuple[int, int]:
        return local_client_range(num_clients, self.mesh)

    def __call__(self, state, local_batches, spec, key, base, hyper=None):
        c = int(np.shape(spec.weight)[0])
        if self._base[0] is not base:
            self._base = (base, replicate(base, self.mesh))
        batches = client_arrays(local_batches, self.mesh, num_clients=c)
        state_g, spec_g, key_g, hyper_g = replicate((state, spec, key, hyper), self.mesh)
        new_state, metrics = to_host(self.round_fn(state_g, batches, spec_g, key_g, self._base[1], hyper_g))
        return jax.tree.map(jnp.asarray, new_state), metrics

    def trace_count(self) -> int:
        return self.round_fn.trace_count()

    @property
    def settings(self):
        return self.round_fn.settings


