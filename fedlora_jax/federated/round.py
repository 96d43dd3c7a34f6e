"""One federated round as ONE ``jax.jit``: client updates, aggregation, algorithm update.

Data flow (once per round), four stages, each a small function below::

    distribute   per-client start adapters (algorithm.distribute, per-client state gathered
                 by client id)
    train        lax.map over chunks of ``chunk_size`` clients, vmap inside a chunk:
                 client_update = lax.scan over S local steps, optax on the trainable leaves,
                 updates masked by the spec (ranks, frozen slots, depth), steps past
                 ``num_steps`` exact no-ops, importance EMA on the side
    screen       non-finite clients dropped (weight 0, reported), optional update clipping
    aggregate    aggregator.aggregate(global, clients, weights, update_masks, state,
                 extras=scores); head FedAvg; per-client state written back by client id;
                 algorithm.server_update(algo_state, RoundOutputs)
    -> new ServerState, metrics

The server half (distribute, screen, aggregate, per-client state, base fold) is
:mod:`fedlora_jax.federated.server`, the functions the Flower deployment calls too; this
module adds the clients' training around them. The engine reads everything method-specific
from the :class:`~fedlora_jax.algorithms.Algorithm` (client options, distribute, per-client
state, server update); its own arguments are engine settings only. The model is abstracted
by a :class:`Task` (a loss on one step's batch), so the same engine serves encoders, decoders and the tiny test models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax import importance as imp
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms.base import Algorithm, ClientOptions
from fedlora_jax.federated.server import (
    as_algorithm,
    check_hyper,
    effective_base,
    gather_clients,
    server_round_update,
)
from fedlora_jax.federated.spec import ClientSpec, ServerHyper, ServerState, pad_clients
from fedlora_jax.models import parallel

Array = jax.Array


class Task(NamedTuple):
    """How a client computes its loss on one step's batch.

    Attributes:
      loss: ``loss(trainable, base, batch, masks, grad_cut, key) -> (scalar, aux)`` where
        ``trainable = {"lora": LoraTree, "head": pytree}``, ``batch`` is one step's slice of
        the client batches (leaves ``[B, ...]``), ``masks`` the client's forward masks and
        ``aux`` a dict with at least ``"count"`` (number of real examples) and optionally
        ``"correct"``. The loss must be a mean over real examples.
      add_base_delta: ``(base, {key: [N, M]}) -> base`` adds a dense update to the frozen
        base kernels (FedEx-LoRA / FLoRA); ``None`` if the task cannot (then such
        aggregators are refused).
    """

    loss: Callable
    add_base_delta: Callable | None = None


class RoundSettings(NamedTuple):
    """Engine settings of a compiled round (static; changing one recompiles)."""

    chunk_size: int
    drop_nonfinite: bool = True
    clip_update_norm: float | None = None
    static_grad_cut: int | None = None
    return_client_models: bool = False


class ClientOutput(NamedTuple):
    """One client's result (a leading ``C`` when stacked).

    Attributes:
      lora: trained adapter. head: trained head.
      scores: triplet scores ``{key: [R]}`` (``{}`` without importance tracking), unmasked.
      loss: mean loss over valid steps. correct, count: totals over valid steps.
      steps_done: number of valid steps.
    """

    lora: Any
    head: Any
    scores: Any
    loss: Array
    correct: Array
    count: Array
    steps_done: Array


def _masked_update(tree_new, tree_old, cond):
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), tree_new, tree_old)


def _mask_lora_updates(updates_lora, update_masks, options: ClientOptions):
    """Zero the optimizer updates of frozen slots (``update_masks == 0``) and frozen factors;
    scale the updates of factors listed in ``options.update_scale``."""
    out = lora_lib.apply_masks(updates_lora, update_masks)
    scale = dict(options.update_scale)
    if options.frozen_parts or scale:
        def fix(u):
            changes = {p: jnp.zeros_like(getattr(u, p)) for p in options.frozen_parts}
            changes.update({p: getattr(u, p) * jnp.asarray(f, getattr(u, p).dtype) for p, f in scale.items()
                            if getattr(u, p) is not None and p not in changes})
            return u._replace(**changes)

        out = {k: fix(u) for k, u in out.items()}
    return out


def client_update(task: Task, optimizer: optax.GradientTransformation, options: ClientOptions,
                  trainable: dict, base: Any, batches: Any, spec: ClientSpec, key: Array, *,
                  round_idx: Array | int = 0) -> ClientOutput:
    """Local training of ONE client: ``lax.scan`` over the ``S`` steps of ``batches``.

    Args:
      task: the model's :class:`Task`.
      optimizer: the inner optax optimizer (fresh state: clients are stateless).
      options: :class:`~fedlora_jax.algorithms.ClientOptions` (importance tracking,
        regulariser, frozen factors, per-factor update scale).
      trainable: ``{"lora": LoraTree, "head": pytree}`` start point (from ``distribute``).
      base: frozen model parameters (no gradient, no optimizer state).
      batches: leaves ``[S, B, ...]``.
      spec: this client's spec (no client axis).
      key: this client's key; step ``s`` uses ``fold_in(key, s)``.
      round_idx: the round (passed to the regulariser, e.g. for a warm-up).

    Returns:
      :class:`ClientOutput`. Scores are *unmasked*: a frozen slot (update mask 0, forward mask
      1) is scored from its gradient like any other, so importance selection can move.

    Frozen slots (``update_masks == 0``) and steps ``>= num_steps`` are exact no-ops: the
    optimizer's *updates* are masked (not only the gradient), so weight decay and momentum
    cannot move them either.
    """
    opt_state = optimizer.init(trainable)
    ema = imp.ema_init(trainable["lora"]) if options.track_importance else None
    regularizer = options.regularizer

    def loss_fn(tr, batch, k):
        loss, aux = task.loss(tr, base, batch, spec.masks, spec.grad_cut, k)
        if regularizer is not None:
            loss = loss + regularizer(tr["lora"], spec.masks, round_idx)
        return loss, aux

    def step(carry, xs):
        tr, ost, ema_s = carry
        s, batch = xs
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, batch, jax.random.fold_in(key, s))
        updates, new_ost = optimizer.update(grads, ost, tr)
        updates = dict(updates, lora=_mask_lora_updates(updates["lora"], spec.update_masks, options))
        new_tr = optax.apply_updates(tr, updates)
        valid = s < spec.num_steps
        new_tr = _masked_update(new_tr, tr, valid)
        new_ost = _masked_update(new_ost, ost, valid)
        if ema_s is not None:
            sens = imp.sensitivity(tr["lora"], grads["lora"])
            new_ema = imp.ema_update(ema_s, sens, beta1=options.beta1, beta2=options.beta2,
                                     uncertainty=options.uncertainty)
            ema_s = _masked_update(new_ema, ema_s, valid)
        correct = aux.get("correct", jnp.zeros((), jnp.float32))
        vf = valid.astype(jnp.float32)
        return (new_tr, new_ost, ema_s), (loss * vf, correct * vf, aux["count"] * vf)

    steps = jnp.arange(jax.tree.leaves(batches)[0].shape[0], dtype=jnp.int32)
    (tr, _, ema), (losses, correct, count) = jax.lax.scan(step, (trainable, opt_state, ema), (steps, batches))
    n_valid = jnp.minimum(spec.num_steps, steps.shape[0]).astype(jnp.float32)
    mean_loss = jnp.sum(losses) / jnp.maximum(n_valid, 1.0)
    scores = {}
    if ema is not None:
        scores = imp.triplet_scores(imp.element_scores(ema, uncertainty=options.uncertainty))
    return ClientOutput(tr["lora"], tr["head"], scores, mean_loss, jnp.sum(correct), jnp.sum(count),
                        n_valid)


def layer_of_key(key: str) -> int | None:
    """The layer index of an adapter key ``"layer.{i}.{module}"``, or ``None`` for another name."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] == "layer" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_cut_variants(cut_variants, static_grad_cut) -> tuple[int, ...] | None:
    """Validate ``cut_variants``: ``None`` or ints >= 0; returns them sorted with 0 added."""
    if cut_variants is None:
        return None
    if static_grad_cut is not None:
        raise ValueError("give either static_grad_cut or cut_variants, not both")
    vals = tuple(cut_variants)
    if any(not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 0 for v in vals):
        raise ValueError(f"cut_variants must be ints >= 0, got {vals!r}")
    return tuple(sorted({0, *(int(v) for v in vals)}))


def _lowest_active_layer(specs: ClientSpec, keys, num_layers_hint: int) -> Array:
    """``[C]`` lowest layer a client needs: ``min(grad_cut, lowest layer with a non-zero mask)``.
    Keys without a layer index count as layer 0 (never skipped)."""
    low = specs.grad_cut.astype(jnp.int32)
    for k in keys:
        i = layer_of_key(k)
        i = 0 if i is None else i
        m = specs.masks[k]
        active = jnp.any(m.reshape(m.shape[0], -1) != 0, axis=-1)
        low = jnp.minimum(low, jnp.where(active, i, num_layers_hint))
    return low


def _task_above(task: Task, cut: int) -> Task:
    """``task`` whose model call sees only the adapters of layers ``>= cut``.

    Exact when no client of the chunk has a non-zero mask or a gradient below ``cut``: the
    dropped adapters add exactly zero, their gradients are exactly zero (unused inputs), and
    since nothing trainable remains below ``cut`` autodiff never builds those layers' backward
    pass nor saves their activations.
    """
    if cut == 0:
        return task

    def keep(tree):
        return {k: v for k, v in tree.items() if (layer_of_key(k) or 0) >= cut}

    def loss(trainable, base, batch, masks, grad_cut, key):
        tr = dict(trainable, lora=keep(trainable["lora"]))
        return task.loss(tr, base, batch, keep(masks), grad_cut, key)

    return task._replace(loss=loss)


def make_round(task: Task, algorithm, *, optimizer: optax.GradientTransformation | None = None,
               chunk_size: int = 8, drop_nonfinite: bool = True, clip_update_norm: float | None = None,
               static_grad_cut: int | None = None, cut_variants=None, mesh: jax.sharding.Mesh | None = None,
               donate: bool = False, return_client_models: bool = False,
               client_state_on_host: bool = False, megatron: bool = False) -> RoundFn:
    """Build the one-jit federated round.

    Args:
      task: the model's :class:`Task`.
      algorithm: an :class:`~fedlora_jax.algorithms.Algorithm` (its client options,
        distribute, per-client state and server update are used), or a bare ``Aggregator``
        (wrapped by :func:`~fedlora_jax.algorithms.base.from_aggregator`: plain clients).
      optimizer: the inner optax optimizer (default ``optax.adamw(1e-4)``); state is created
        per client per round (stateless clients) over the trainable leaves only.
      chunk_size: static number of clients processed at once (``vmap``); chunks go through
        ``lax.map``, so memory is bounded by the chunk, not by ``C``. ``C`` need not divide:
        padding clients get weight 0 and 0 steps (exact no-ops).
      drop_nonfinite: a client whose result has NaN/inf gets weight 0 and its result is
        replaced by the start point (so ``0 * nan`` never reaches the average); reported.
      clip_update_norm: optional server-side clip of each client's adapter update norm.
      static_grad_cut: a Python int ``k``: every client's backward pass stops below layer ``k``
        *statically* (the layers below are never differentiated, so their backward FLOPs and
        saved activations really disappear), instead of the per-client dynamic cut of the spec
        (which zeroes the same gradients but still runs the work under ``vmap``). A different
        ``k`` is a different program: build one round per cut.
      cut_variants: static gradient cuts compiled into ONE round (e.g. ``(3, 5)``; 0 is
        always added): clients are ordered by their lowest needed layer (``min(grad_cut,
        lowest layer with a non-zero mask)``), chunked, and each chunk runs, through
        ``lax.switch`` (a real branch: the index is per chunk, not vmapped), the variant with
        the largest cut ``<=`` its clients' lowest layer. That variant's model call sees only
        the adapters at or above its cut, so the backward pass and the saved activations
        below it disappear (LEGEND's shallow clients pay only for their depth) with the same
        values and gradients as the dynamic cut and no recompilation across rounds. Needs
        adapter keys ``"layer.{i}.{module}"`` (other keys are never skipped) and a task that
        accepts an adapter tree with only some of the keys (the library's models do).
        Excludes ``static_grad_cut``.
      mesh: optional ``jax.sharding.Mesh`` with a ``"clients"`` axis: client-stacked inputs
        are sharded along it (the chunk axis), base weights replicated.
      megatron: with a mesh that also has a ``"model"`` axis and the frozen base placed by
        :func:`fedlora_jax.plan.base_partition_spec` (``"megatron"``): each transformer
        block runs as one ``shard_map`` over ``"model"`` (or, where its heads do not split,
        each column- / row-parallel linear), with each client's LoRA factors split like the
        kernel (:mod:`fedlora_jax.models.parallel`), so the low-rank path adds no all-gather
        of the activations. Same values as without it.
      donate: donate the server state buffers to the round.
      client_state_on_host: the population's per-client state (``ServerState.clients``,
        leaves ``[K, ...]``) stays in host memory as NumPy arrays; each round sends only the
        sampled clients' slices to the device and writes their new values back **in place**
        (so the state passed in is updated too). For populations whose state does not fit,
        or should not sit, on the device (e.g. 10,000 FedSA clients). Build the state with
        ``init_server_state(..., client_state_on_host=True)``. Same numbers as on the device.
      return_client_models: also return every client's trained adapter and head (after
        screening) as ``metrics["client_lora"]`` / ``metrics["client_head"]`` (leaves
        ``[C, ...]``): diagnostics such as a client's accuracy before aggregation.

    Returns:
      a :class:`RoundFn`: ``round_fn(server_state, client_batches, client_specs, key, base,
      hyper=None) -> (state, metrics)`` where ``client_batches`` leaves are ``[C, S, B, ...]``,
      ``client_specs`` a stacked :class:`ClientSpec`, ``key`` the *round* key
      (``fold_in(seed_key, round)``; client keys are ``fold_in(key, client_id)``), ``base``
      the frozen model parameters, ``hyper`` an optional :class:`~fedlora_jax.federated.ServerHyper`
      (server hyperparameters as arrays: the round is differentiable with respect to them
      and to ``client_specs.weight``; see :mod:`fedlora_jax.federated.hypergrad`).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if static_grad_cut is not None and (not isinstance(static_grad_cut, int) or static_grad_cut < 0):
        raise ValueError(f"static_grad_cut must be None or an int >= 0, got {static_grad_cut!r}")
    if clip_update_norm is not None and not clip_update_norm > 0:
        raise ValueError(f"clip_update_norm must be None or > 0, got {clip_update_norm!r}")
    if mesh is not None and "clients" not in mesh.axis_names:
        raise ValueError(f"mesh must have a 'clients' axis, got axes {mesh.axis_names}")
    if megatron and (mesh is None or "model" not in mesh.axis_names):
        raise ValueError("megatron=True needs a mesh with a 'model' axis (e.g. axes ('clients', 'model')), got "
                         f"{None if mesh is None else mesh.axis_names}")
    variants = check_cut_variants(cut_variants, static_grad_cut)
    algo = as_algorithm(algorithm)
    optimizer = optax.adamw(1e-4) if optimizer is None else optimizer
    settings = RoundSettings(chunk_size, drop_nonfinite, clip_update_norm, static_grad_cut,
                             bool(return_client_models))
    distribute = algo.distribute_fn()
    rule = algo.client_state
    traces = [0]

    def train(state, batches, specs, own, key, base_eff):
        """Distribute + local training of every client, chunked; returns stacked outputs."""
        c = specs.weight.shape[0]
        k = min(chunk_size, c)
        n_chunks = -(-c // k)
        c_pad = n_chunks * k
        if mesh is not None and k % mesh.shape["clients"]:
            raise ValueError(f"chunk_size {k} must be a multiple of the mesh's clients axis "
                             f"({mesh.shape['clients']})")
        shared = specs.global_masks
        per_client = specs._replace(global_masks=None)
        order = None
        if variants is not None:
            big = max(variants[-1], max((layer_of_key(kk) or 0) for kk in state.lora) + 1)
            low = _lowest_active_layer(per_client, tuple(state.lora), big)
            order = jnp.argsort(low, stable=True)
            batches, per_client, own = gather_clients((batches, per_client, own), order)
        batches_p, specs_p, own_p = pad_clients((batches, per_client, own), c_pad)
        pad_flag = jnp.arange(c_pad) < c
        specs_p = specs_p._replace(weight=specs_p.weight * pad_flag, num_steps=specs_p.num_steps * pad_flag)
        chunk_variant = None
        if variants is not None:
            low_p = jnp.where(pad_flag, pad_clients(low[order], c_pad), big)     # padding never lowers a chunk
            chunk_low = jnp.min(low_p.reshape(n_chunks, k), axis=1)                       # [n_chunks]
            chunk_variant = jnp.searchsorted(jnp.asarray(variants), chunk_low, side="right") - 1

        # On a mesh, chunk j holds clients {i * n_chunks + j}: every device's chunk rows are clients
        # whose batches it already holds (contiguous blocks of the "clients"-sharded [C] inputs), so
        # forming chunks moves nothing between chips. (Cut variants need contiguous sorted chunks.)
        interleave = mesh is not None and variants is None

        def to_chunks(x):
            if interleave:
                y = x.reshape((k, n_chunks) + x.shape[1:]).swapaxes(0, 1)
            else:
                y = x.reshape((n_chunks, k) + x.shape[1:])
            if mesh is not None:
                spec = jax.sharding.PartitionSpec(None, "clients")
                y = jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
            return y

        def one_client(b, sp, own_c, gm, task_v):
            if gm is not None:
                sp = sp._replace(masks=gm)
            if static_grad_cut is not None:
                sp = sp._replace(grad_cut=static_grad_cut)
            start = distribute(state, sp.masks, own_c)
            trainable = {"lora": start, "head": state.head}
            ck = jax.random.fold_in(key, sp.client_id)
            out = client_update(task_v, optimizer, algo.client, trainable, base_eff, b, sp, ck, round_idx=state.round)
            return out, start

        # With a mesh, the client axis of the vmap is the mesh's "clients" axis (DrJAX's
        # spmd_axis_name): a sharding constraint inside the per-client code keeps clients on it.
        spmd_axis = "clients" if mesh is not None else None

        def chunk_fn(task_v):
            return lambda b, sp, own_c: jax.vmap(lambda *a: one_client(*a, task_v), in_axes=(0, 0, 0, None),
                                                 spmd_axis_name=spmd_axis)(b, sp, own_c, shared)

        if variants is None:
            def one_chunk(xs):
                return chunk_fn(task)(*xs)
            xs = jax.tree.map(to_chunks, (batches_p, specs_p, own_p))
        else:
            branches = [chunk_fn(_task_above(task, v)) for v in variants]

            def one_chunk(xs):
                idx, b, sp, own_c = xs
                return jax.lax.switch(idx, branches, b, sp, own_c)
            xs = (chunk_variant,) + jax.tree.map(to_chunks, (batches_p, specs_p, own_p))

        outs, starts = jax.lax.map(one_chunk, xs)

        def from_chunks(x):
            if interleave:
                x = x.swapaxes(0, 1)
            return x.reshape((c_pad,) + x.shape[2:])[:c]

        outs, starts = jax.tree.map(from_chunks, (outs, starts))
        if order is not None:
            inverse = jnp.argsort(order)
            outs, starts = gather_clients((outs, starts), inverse)
        return outs, starts

    host_state = bool(client_state_on_host) and rule is not None

    def impl(state: ServerState, batches, specs: ClientSpec, key, base, hyper=None, own_in=None):
        if megatron:
            with parallel.megatron(mesh):
                return round_body(state, batches, specs, key, base, hyper, own_in)
        return round_body(state, batches, specs, key, base, hyper, own_in)

    def round_body(state, batches, specs, key, base, hyper, own_in):
        traces[0] += 1
        base_eff = effective_base(task, base, state.agg_state)
        if host_state:
            own = own_in
        else:
            own = gather_clients(state.clients, specs.client_id) if rule is not None else ()
        outs, starts = train(state, batches, specs, own, key, base_eff)
        update = server_round_update(algo, state, outs, starts, specs, own, drop_nonfinite=drop_nonfinite,
                                     clip_update_norm=clip_update_norm, hyper=hyper, write_clients=not host_state)
        new_state, metrics = update.state, update.metrics
        if settings.return_client_models:
            metrics["client_lora"], metrics["client_head"] = update.screened.lora, update.screened.head
        if host_state:
            return new_state, metrics, (update.own, update.screened.weights > 0)
        return new_state, metrics

    jitted = jax.jit(impl, donate_argnums=(0,) if donate else ())
    return RoundFn(jitted, traces, settings, algo, mesh, donates=bool(donate), host_client_state=host_state)


def check_round_inputs(state: ServerState, specs: ClientSpec) -> None:
    """Host-side checks before tracing: the spec's masks match the global adapter's keys and
    ``[C, R]`` shapes, and client ids lie inside the population of the per-client state.

    Raises:
      ValueError: naming the module, the shape or the id.
    """
    c = int(np.shape(specs.weight)[0])
    for name in ("masks", "update_masks"):
        masks = getattr(specs, name)
        if set(masks) != set(state.lora):
            raise ValueError(f"client spec {name} keys {sorted(masks)} do not match the adapter's keys "
                             f"{sorted(state.lora)}")
        for k, m in masks.items():
            want = (c, state.lora[k].a.shape[-1])
            if tuple(np.shape(m)) != want:
                raise ValueError(f"client spec {name}[{k!r}] has shape {tuple(np.shape(m))}, expected [C, R] = {want}")
    if specs.global_masks is not None:
        for k, m in specs.global_masks.items():
            if tuple(np.shape(m)) != (state.lora[k].a.shape[-1],):
                raise ValueError(f"client spec global_masks[{k!r}] has shape {tuple(np.shape(m))}, expected [R]")
    leaves = jax.tree.leaves(state.clients)
    if leaves and not isinstance(specs.client_id, jax.core.Tracer):
        population = int(np.shape(leaves[0])[0])
        ids = np.asarray(specs.client_id)
        if ids.size and (ids.min() < 0 or ids.max() >= population):
            raise ValueError(f"client ids {ids.tolist()} lie outside the population of {population} clients whose "
                             "state the server keeps (ids must be in [0, num_clients))")


class RoundFn:
    """A compiled federated round: ``round_fn(state, batches, specs, key, base)``.

    Attributes:
      jitted: the ``jax.jit`` function (``.lower(...)`` for cost analysis).
      settings: the :class:`RoundSettings`.
      algorithm: the :class:`~fedlora_jax.algorithms.Algorithm` it runs.
      donates: whether the server state is donated (then it cannot be differentiated through).
    """

    def __init__(self, jitted, traces, settings: RoundSettings, algorithm: Algorithm, mesh, donates: bool = False,
                 host_client_state: bool = False):
        self.jitted, self._traces, self.settings, self.algorithm, self._mesh = jitted, traces, settings, algorithm, mesh
        self.donates, self.host_client_state = donates, host_client_state

    def __call__(self, server_state, client_batches, client_specs, key, base, hyper: ServerHyper | None = None):
        check_round_inputs(server_state, client_specs)
        check_hyper(hyper, self.algorithm.aggregator)
        if self.host_client_state:
            return self._call_host_state(server_state, client_batches, client_specs, key, base, hyper)
        return self._run(server_state, client_batches, client_specs, key, base, hyper)

    def _run(self, *args):
        if self._mesh is not None:
            use_mesh = jax.sharding.use_mesh if hasattr(jax.sharding, "use_mesh") else (lambda m: m)
            with use_mesh(self._mesh):
                return self.jitted(*args)
        return self.jitted(*args)

    def _call_host_state(self, state, batches, specs, key, base, hyper):
        """Gather the sampled clients' state on the host, run, write it back in place."""
        clients = host_client_tree(state.clients)
        ids = np.asarray(specs.client_id)
        own = jax.tree.map(lambda x: x[ids], clients)
        new_state, metrics, (new_own, keep) = self._run(state._replace(clients=()), batches, specs, key, base,
                                                        hyper, own)
        keep = np.asarray(keep)
        sel = ids[keep]

        def put(x, new):
            x[sel] = np.asarray(new)[keep]
            return x

        clients = jax.tree.map(put, clients, new_own)
        return new_state._replace(clients=clients), metrics

    def trace_count(self) -> int:
        """How many times the round was traced (compiled); 1 in a healthy run."""
        return self._traces[0]


def host_client_tree(tree):
    """Leaves as writable NumPy arrays (a restored checkpoint may hold jax arrays or read-only
    views); leaves that already are writable arrays are kept, not copied."""
    def fix(x):
        if isinstance(x, np.ndarray) and x.flags.writeable:
            return x
        return np.array(x)

    return jax.tree.map(fix, tree)


def population_state_bytes(algorithm, lora, num_clients: int) -> int:
    """Bytes of the per-client state of ``num_clients`` clients (0 without per-client state);
    from shapes only (``jax.eval_shape``), nothing is allocated."""
    algo = as_algorithm(algorithm)
    if algo.client_state is None:
        return 0
    shapes = jax.eval_shape(lambda lo: algo.client_state.init(lo, num_clients), lora)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


def init_server_state(lora, head, algorithm, *, num_clients: int = 0,
                      client_state_on_host: bool = False) -> ServerState:
    """Round-0 server state: the aggregator's state, the algorithm's state and, for algorithms
    with per-client state, that state for a population of ``num_clients`` (on the host as
    NumPy arrays with ``client_state_on_host``, for ``make_round(client_state_on_host=True)``).

    ``algorithm``: an :class:`~fedlora_jax.algorithms.Algorithm` or a bare ``Aggregator``.
    """
    algo = as_algorithm(algorithm)
    clients = ()
    if algo.client_state is not None:
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"algorithm {algo.name!r} keeps per-client state: num_clients must be an int >= 1, "
                             f"got {num_clients!r}")
        if client_state_on_host:
            with jax.default_device(jax.devices("cpu")[0]):
                clients = host_client_tree(jax.device_get(algo.client_state.init(lora, num_clients)))
        else:
            clients = algo.client_state.init(lora, num_clients)
    return ServerState(jnp.zeros((), jnp.int32), lora, head, algo.aggregator.init(lora), algo.init(lora), clients)


def round_key(seed: int, round_idx) -> Array:
    """The key of round ``round_idx``: ``fold_in(key(seed), round_idx)``."""
    return jax.random.fold_in(jax.random.key(seed), np.asarray(round_idx, np.uint32))
