"""Meshes and placements for the round: clients on one axis, optionally base weights on another.

Single host::

    mesh = client_mesh()                          # all local devices on a "clients" axis
    mesh = client_mesh(model=2)                   # ("clients", "model") = (n/2, 2)
    base = shard_base(base, mesh)                 # kernels split on "model" where divisible
    base = shard_base(base, mesh, placement="megatron")   # for make_round(..., megatron=True)
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


#: Placements of :func:`shard_base` on a ``"model"`` axis.
PLACEMENTS = ("columns", "megatron")


def shard_base(base, mesh: Mesh, *, placement: str = "columns"):
    """Place the frozen base; without a ``"model"`` axis everything is replicated.

    ``placement``: ``"columns"``: 2-D kernels ``[N, M]`` split along ``M`` where ``M`` divides,
    everything else replicated (any model, whatever its leaf names). ``"megatron"``: column-parallel
    q/k/v/gate/up, row-parallel o/down, embeddings over the vocabulary
    (:func:`fedlora_jax.models.parallel.megatron_spec`, the placement ``fedlora plan`` uses), for
    ``make_round(..., megatron=True)``, whose ``shard_map``s expect it (another placement gives
    the same values after XLA re-shards the kernels inside the round).
    """
    from fedlora_jax.models import parallel

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    n_model = mesh.shape.get("model", 1)

    def spec(path, x):
        if n_model <= 1 or getattr(x, "ndim", 0) != 2:
            return PartitionSpec()
        if placement == "megatron":
            return parallel.megatron_spec(path, x.shape, n_model)
        return PartitionSpec(None, "model") if x.shape[1] % n_model == 0 else PartitionSpec()

    return jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, NamedSharding(mesh, spec(p, x))), base)
