"""One federated round as ONE ``jax.jit``: client updates, rank rules, aggregation.

Data flow (once per round)::

    server_state --distribute--> per-client start adapters
      lax.map over chunks of ``chunk_size`` clients, vmap inside a chunk:
        client_update: lax.scan over S local steps, optax on the trainable leaves only,
                       updates masked by the spec (ranks, frozen slots, depth), steps past
                       ``num_steps`` exact no-ops, importance EMA on the side
      non-finite clients dropped (weight 0, reported)
      aggregator.aggregate(global, clients, weights, update_masks, state, extras=scores)
      head: weighted FedAvg;  rank_rule(state, scores) -> new algorithm state
    -> new ServerState, metrics

The model is abstracted by a :class:`Task` (a loss on one step's batch), so the same engine
serves encoders, decoders and the tiny test models.
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
from fedlora_jax.aggregation import comm_params
from fedlora_jax.federated.spec import ClientSpec, ServerState, pad_clients

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


class RoundConfig(NamedTuple):
    """Static settings of a compiled round (hashable; changing one recompiles)."""

    chunk_size: int
    track_importance: bool = False
    beta1: float = 0.85
    beta2: float = 0.85
    shared_masks: bool = False
    drop_nonfinite: bool = True
    clip_update_norm: float | None = None
    frozen_parts: tuple[str, ...] = ()


class ClientOutput(NamedTuple):
    lora: Any
    head: Any
    scores: Any
    loss: Array
    correct: Array
    count: Array
    steps_done: Array


def _masked_update(tree_new, tree_old, cond):
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), tree_new, tree_old)


def _mask_lora_updates(updates_lora, update_masks, frozen_parts=()):
    """Zero the optimizer updates of frozen slots (``update_masks == 0``) and frozen factors."""
    out = lora_lib.apply_masks(updates_lora, update_masks)
    if frozen_parts:
        out = {k: u._replace(**{p: jnp.zeros_like(getattr(u, p)) for p in frozen_parts}) for k, u in out.items()}
    return out


def client_update(task: Task, optimizer: optax.GradientTransformation, config: RoundConfig,
                  trainable: dict, base: Any, batches: Any, spec: ClientSpec, key: Array,
                  regularizer: Callable | None = None) -> ClientOutput:
    """Local training of ONE client: ``lax.scan`` over the ``S`` steps of ``batches``.

    Args:
      trainable: ``{"lora": LoraTree, "head": pytree}`` start point (from ``distribute``).
      base: frozen model parameters (no gradient, no optimizer state).
      batches: leaves ``[S, B, ...]``.
      spec: this client's spec (no client axis).
      key: this client's key; step ``s`` uses ``fold_in(key, s)``.
      regularizer: optional ``(lora, masks) -> scalar`` added to the loss (FedARA orth.).

    Returns:
      :class:`ClientOutput` with the trained adapter and head, triplet importance scores
      (``{key: [R]}`` or ``{}``), mean loss over valid steps, correct/count totals.

    Frozen slots (``update_masks == 0``) and steps ``>= num_steps`` are exact no-ops: the
    optimizer's *updates* are masked (not only the gradient), so weight decay and momentum
    cannot move them either.
    """
    opt_state = optimizer.init(trainable)
    ema = imp.ema_init(trainable["lora"]) if config.track_importance else None

    def loss_fn(tr, batch, k):
        loss, aux = task.loss(tr, base, batch, spec.masks, spec.grad_cut, k)
        if regularizer is not None:
            loss = loss + regularizer(tr["lora"], spec.masks)
        return loss, aux

    def step(carry, xs):
        tr, ost, ema_s = carry
        s, batch = xs
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, batch, jax.random.fold_in(key, s))
        updates, new_ost = optimizer.update(grads, ost, tr)
        updates = dict(updates, lora=_mask_lora_updates(updates["lora"], spec.update_masks,
                                                        config.frozen_parts))
        new_tr = optax.apply_updates(tr, updates)
        valid = s < spec.num_steps
        new_tr = _masked_update(new_tr, tr, valid)
        new_ost = _masked_update(new_ost, ost, valid)
        if ema_s is not None:
            sens = imp.sensitivity(tr["lora"], grads["lora"])
            new_ema = imp.ema_update(ema_s, sens, beta1=config.beta1, beta2=config.beta2)
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
        scores = imp.triplet_scores(imp.element_scores(ema))
        scores = {k: v * spec.update_masks[k] for k, v in scores.items()}
    return ClientOutput(tr["lora"], tr["head"], scores, mean_loss, jnp.sum(correct), jnp.sum(count),
                        n_valid)


def _tree_norm(tree):
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros(())


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _weighted_mean(stacked, weights, fallback):
    tot = jnp.sum(weights)
    w = weights / jnp.maximum(tot, 1e-30)

    def avg(x, old):
        new = jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype)
        return jnp.where(tot > 0, new, old)

    return jax.tree.map(avg, stacked, fallback)


def make_round(task: Task, aggregator, *, optimizer: optax.GradientTransformation | None = None,
               chunk_size: int = 8, track_importance: bool = False, beta1: float = 0.85,
               beta2: float = 0.85, shared_masks: bool = False, regularizer: Callable | None = None,
               rank_rule: Callable | None = None, drop_nonfinite: bool = True,
               clip_update_norm: float | None = None, frozen_parts: tuple[str, ...] = (),
               uplink_bytes_per_param: int = 4, personal_lora: bool = False,
               static_grad_cut: int | None = None,
               mesh: jax.sharding.Mesh | None = None, donate: bool = False):
    """Build the one-jit federated round.

    Args:
      task: the model's :class:`Task`.
      aggregator: an ``Aggregator`` (see ``fedlora_jax.aggregation``).
      optimizer: the inner optax optimizer (default ``optax.adamw(1e-4)``); state is created
        per client per round (stateless clients) over the trainable leaves only.
      chunk_size: static number of clients processed at once (``vmap``); chunks go through
        ``lax.map``, so memory is bounded by the chunk, not by ``C``. ``C`` need not divide:
        padding clients get weight 0 and 0 steps (exact no-ops).
      track_importance: keep AdaLoRA EMA scores during local training and return triplet
        scores (HAFL, FedARA); passed to the aggregator as ``extras["scores"]``.
      shared_masks: spec masks are global ``[R]`` leaves (not batched over clients): lets a
        module with an all-zero mask skip its adapter matmul (FedARA module pruning).
      regularizer: ``(lora, masks) -> scalar`` added to every client's loss.
      rank_rule: ``(server_state, agg_scores) -> extra`` run inside the jit after
        aggregation (e.g. FedARA's budgeted mask update); default keeps ``extra``.
      drop_nonfinite: a client whose result has NaN/inf gets weight 0 and its result is
        replaced by the start point (so ``0 * nan`` never reaches the average); reported.
      clip_update_norm: optional server-side clip of each client's adapter update norm.
      frozen_parts: factors no client ever updates, e.g. ``("a",)`` for FFA-LoRA.
      uplink_bytes_per_param: bytes per sent parameter for the communication metrics.
      static_grad_cut: a Python int ``k``: every client's backward pass stops below layer ``k``
        *statically* (the layers below are never differentiated, so their backward FLOPs and
        saved activations really disappear), instead of the per-client dynamic cut of the spec
        (which zeroes the same gradients but still runs the work under ``vmap``). A different
        ``k`` is a different program: build one round per cut (FedARA's cut only moves up).
      personal_lora: keep every client's last adapter in ``server_state.extra["personal"]``
        (leaves ``[K, ...]`` for the whole population, indexed by ``client_id``) and pass it to
        ``distribute(..., client_lora=...)``: client-local factors (FedSA-LoRA keeps ``b``).
      mesh: optional ``jax.sharding.Mesh`` with a ``"clients"`` axis: client-stacked inputs
        are sharded along it (the chunk axis), base weights replicated.
      donate: donate the server state buffers to the round.

    Returns:
      ``round_fn(server_state, client_batches, client_specs, key, base) -> (state, metrics)``
      where ``client_batches`` leaves are ``[C, S, B, ...]``, ``client_specs`` a stacked
      :class:`ClientSpec`, ``key`` the *round* key (``fold_in(seed_key, round)``; client
      keys are ``fold_in(key, client_id)``), ``base`` the frozen model parameters.
      ``round_fn.trace_count()`` tells how many times it was traced (compiled).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if static_grad_cut is not None and (not isinstance(static_grad_cut, int) or static_grad_cut < 0):
        raise ValueError(f"static_grad_cut must be None or an int >= 0, got {static_grad_cut!r}")
    optimizer = optax.adamw(1e-4) if optimizer is None else optimizer
    config = RoundConfig(chunk_size, track_importance, beta1, beta2, shared_masks, drop_nonfinite,
                         clip_update_norm, tuple(frozen_parts))
    if mesh is not None and "clients" not in mesh.axis_names:
        raise ValueError(f"mesh must have a 'clients' axis, got axes {mesh.axis_names}")
    traces = [0]

    def impl(state: ServerState, batches, specs: ClientSpec, key, base):
        traces[0] += 1
        c = specs.weight.shape[0]
        k = min(chunk_size, c)
        n_chunks = -(-c // k)
        c_pad = n_chunks * k
        if mesh is not None and k % mesh.shape["clients"]:
            raise ValueError(f"chunk_size {k} must be a multiple of the mesh's clients axis "
                             f"({mesh.shape['clients']})")
        base_eff = base
        base_delta = getattr(state.agg_state, "base_delta", None)
        if base_delta is not None:
            if task.add_base_delta is None:
                raise ValueError(f"aggregator {aggregator.name!r} folds updates into the base, "
                                 "but the task has no add_base_delta")
            base_eff = task.add_base_delta(base, base_delta)

        shared = (specs.masks,) if shared_masks else ()
        per_client = specs._replace(masks=None) if shared_masks else specs
        padded = pad_clients((batches, per_client), c_pad)
        (batches_p, specs_p) = padded
        pad_flag = jnp.arange(c_pad) < c
        specs_p = specs_p._replace(weight=specs_p.weight * pad_flag, num_steps=specs_p.num_steps * pad_flag)

        def to_chunks(x):
            y = x.reshape((n_chunks, k) + x.shape[1:])
            if mesh is not None:
                spec = jax.sharding.PartitionSpec(None, "clients")
                y = jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
            return y

        chunked = jax.tree.map(to_chunks, (batches_p, specs_p))

        personal = state.extra.get("personal") if personal_lora else None

        def one_client(b, sp, *maybe_masks):
            if shared_masks:
                sp = sp._replace(masks=maybe_masks[0])
            if static_grad_cut is not None:
                sp = sp._replace(grad_cut=static_grad_cut)
            if personal is not None:
                own = jax.tree.map(lambda x: x[sp.client_id], personal)
                start = aggregator.distribute(state.lora, sp.masks, state.agg_state, client_lora=own)
            else:
                start = aggregator.distribute(state.lora, sp.masks, state.agg_state)
            trainable = {"lora": start, "head": state.head}
            ck = jax.random.fold_in(key, sp.client_id)
            out = client_update(task, optimizer, config, trainable, base_eff, b, sp, ck, regularizer)
            return out, start

        in_axes = (0, 0) + ((None,) if shared_masks else ())

        def one_chunk(xs):
            b, sp = xs
            return jax.vmap(one_client, in_axes=in_axes)(b, sp, *shared)

        outs, starts = jax.lax.map(one_chunk, chunked)
        unchunk = lambda x: x.reshape((c_pad,) + x.shape[2:])[:c]
        outs, starts = jax.tree.map(unchunk, (outs, starts))

        # Update norms, non-finite detection, optional clipping.
        delta_lora = jax.tree.map(lambda n, s: n.astype(jnp.float32) - s.astype(jnp.float32),
                                  outs.lora, starts)
        norms = jax.vmap(_tree_norm)(delta_lora)
        finite = jax.vmap(_all_finite)((outs.lora, outs.head)) & jnp.isfinite(outs.loss)
        weights = specs.weight
        client_lora, client_head = outs.lora, outs.head
        if drop_nonfinite:
            weights = jnp.where(finite, weights, 0.0)
            client_lora = jax.tree.map(
                lambda x, s: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, s.astype(x.dtype)),
                client_lora, starts)
            client_head = jax.tree.map(
                lambda x, s: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, s[None]),
                client_head, state.head)
        if clip_update_norm is not None:
            factor = jnp.minimum(1.0, clip_update_norm / jnp.maximum(norms, 1e-12))
            client_lora = jax.tree.map(
                lambda x, s: (s.astype(jnp.float32) + factor.reshape((-1,) + (1,) * (x.ndim - 1))
                              * (x.astype(jnp.float32) - s.astype(jnp.float32))).astype(x.dtype),
                client_lora, starts)

        upd_masks = specs.update_masks
        extras = {"scores": outs.scores} if track_importance else None
        new_lora, new_agg = aggregator.aggregate(state.lora, client_lora, weights, upd_masks,
                                                 state.agg_state, extras=extras)
        new_head = _weighted_mean(client_head, weights, state.head)

        agg_scores = {}
        if track_importance:
            wn = weights / jnp.maximum(jnp.sum(weights), 1e-30)
            agg_scores = {kk: jnp.tensordot(wn, v, axes=1) for kk, v in outs.scores.items()}
        new_extra = state.extra
        if personal is not None:
            # Client-local factors (FedSA-LoRA's b): store every sampled client's result.
            ids = specs.client_id
            new_extra = dict(state.extra, personal=jax.tree.map(
                lambda p, x: p.at[ids].set(x.astype(p.dtype)), personal, client_lora))
        new_state = ServerState(state.round + 1, new_lora, new_head, new_agg, new_extra)
        extra = rank_rule(new_state, agg_scores) if rank_rule is not None else new_extra
        new_state = new_state._replace(extra=extra)

        up_masks = specs.update_masks
        down_masks = specs.masks if not shared_masks else jax.tree.map(
            lambda m: jnp.broadcast_to(m, (c,) + m.shape), specs.masks)
        up = comm_params(aggregator, state.lora, up_masks, direction="up")
        down = comm_params(aggregator, state.lora, down_masks, direction="down")
        tot_w = jnp.maximum(jnp.sum(weights), 1e-30)
        count = jnp.maximum(outs.count, 1.0)
        metrics = {
            "client_loss": outs.loss,
            "client_accuracy": outs.correct / count,
            "client_examples": outs.count,
            "client_steps": outs.steps_done,
            "client_update_norm": norms,
            "client_finite": finite,
            "client_weight": weights,
            "client_params_up": up,
            "client_params_down": down,
            "client_bytes_up": up * uplink_bytes_per_param,
            "client_bytes_down": down * uplink_bytes_per_param,
            "train_loss": jnp.sum(weights * outs.loss) / tot_w,
            "train_accuracy": jnp.sum(outs.correct) / jnp.maximum(jnp.sum(outs.count), 1.0),
            "num_dropped_nonfinite": jnp.sum(~finite & (specs.weight > 0)),
            "agg_scores": agg_scores,
            "client_scores": outs.scores,
        }
        return new_state, metrics

    jitted = jax.jit(impl, donate_argnums=(0,) if donate else ())

    def round_fn(server_state, client_batches, client_specs, key, base):
        if mesh is not None:
            with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
                return jitted(server_state, client_batches, client_specs, key, base)
        return jitted(server_state, client_batches, client_specs, key, base)

    round_fn.trace_count = lambda: traces[0]
    round_fn.jitted = jitted
    round_fn.config = config
    return round_fn


def init_server_state(lora, head, aggregator, extra: dict | None = None) -> ServerState:
    """Round-0 server state: ``aggregator.init(lora)`` and an int32 round counter."""
    return ServerState(jnp.zeros((), jnp.int32), lora, head, aggregator.init(lora), extra or {})


def round_key(seed: int, round_idx) -> Array:
    """The key of round ``round_idx``: ``fold_in(key(seed), round_idx)``."""
    return jax.random.fold_in(jax.random.key(seed), np.asarray(round_idx, np.uint32))
