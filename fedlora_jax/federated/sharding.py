"""Meshes and placements for the round: clients on one axis, optionally base weights on another.

Single host::

    mesh = client_mesh()                          # all local devices on a "clients" axis
    mesh = client_mesh(model=2)                   # ("clients", "model") = (n/2, 2)
    base = shard_base(base, mesh)                 # kernels split on "model" where divisible
    round_fn = make_round(task, agg, chunk_size=k, mesh=mesh)   # k a multiple of mesh "clients"

Several processes / hosts: see :mod:`fedlora_jax.federated.multiprocess`. Every process calls
``multiprocess.initialize(...)`` first; ``multiprocess.global_client_mesh()`` then spans every
device of every process (ordered by process, so each owns a contiguous block of ``"clients"``),
each process builds only its own clients' batches (``multiprocess.local_client_range``,
``multiprocess.client_arrays``), and the same ``round_fn`` runs as one SPMD program.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def client_mesh(devices=None, *, model: int = 1) -> Mesh:
    """A ``("clients",)`` mesh, or ``("clients", "model")`` with ``model`` devices per group.

    Raises:
      ValueError: if ``model`` does not divide the number of devices.
    """
    devs = np.asarray(jax.devices() if devices is None else devices)
    n = devs.size
    if model < 1 or n % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {n} devices")
    if model == 1:
        return Mesh(devs.reshape(n), ("clients",))
    return Mesh(devs.reshape(n // model, model), ("clients", "model"))


def shard_base(base, mesh: Mesh):
    """Place the frozen base: 2-D kernels ``[N, M]`` split along ``M`` on the ``"model"`` axis
    where ``M`` divides evenly, everything else replicated. Without a ``"model"`` axis: replicated."""
    n_model = mesh.shape.get("model", 1)

    def place(x):
        if n_model > 1 and getattr(x, "ndim", 0) == 2 and x.shape[1] % n_model == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "model")))
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, base)
