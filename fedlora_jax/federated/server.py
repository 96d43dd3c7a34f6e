"""The server half of a federated round, written once: distribute, screen, aggregate, write the
per-client state back, fold the base delta.

Pure functions of arrays. The engine's round (:func:`~fedlora_jax.federated.make_round`)
calls them inside its one ``jax.jit``; the Flower deployment
(:mod:`fedlora_jax.deploy.flower`) jits them on the server around the replies it received;
the driver's diagnostics ask :func:`client_start` what one client receives. So the three
agree by construction, not by copy.

One round's server half::

    own    = gather_clients(state.clients, client_ids)              # per-client state [C, ...]
    starts = distribute_clients(algorithm, state, masks, own)       # what each client starts from
    ... clients train (the round's lax.map/vmap, or Flower's ClientApps) -> outs [C, ...] ...
    update = server_round_update(algorithm, state, outs, starts, specs, own, ...)
             #  screen (non-finite dropped with weight 0, optional clipping)
             #  -> aggregator.aggregate -> head FedAvg -> optional server step (hyper)
             #  -> per-client state written back where weight > 0 -> algorithm.server_update
    base_eff = effective_base(task, base, update.state.agg_state)   # FLoRA / FedEx-LoRA fold

``C`` clients of the round, ``K`` the population whose state the server keeps, ``R`` rank.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.algorithms.base import Algorithm, RoundOutputs, from_aggregator
from fedlora_jax.federated.spec import ClientSpec, ServerHyper, ServerState

Array = jax.Array


def as_algorithm(algorithm) -> Algorithm:
    """``algorithm`` itself, or a bare ``Aggregator`` wrapped as a plan-less algorithm."""
    return algorithm if isinstance(algorithm, Algorithm) else from_aggregator(algorithm)


# ----------------------------------------------------------------------------- base fold


def effective_base(task, base: Any, agg_state: Any) -> Any:
    """The frozen base with the aggregator's folded dense update (FLoRA / FedEx-LoRA) added.

    The one place the base-delta fold is asked for: ``agg_state.base_delta`` (``{key: [N, M]}``)
    when the aggregator keeps one, else ``base`` unchanged. ``task`` needs ``add_base_delta``
    only when there is a delta to fold.
    """
    base_delta = getattr(agg_state, "base_delta", None)
    if base_delta is None:
        return base
    if task.add_base_delta is None:
        raise ValueError("the aggregator folds updates into the base, but the task has no add_base_delta")
    return task.add_base_delta(base, base_delta)


# ----------------------------------------------------------------------------- per-client state


def per_client(flag: Array, x: Array) -> Array:
    """Broadcast a ``[C]`` flag against a ``[C, ...]`` leaf."""
    return flag.reshape((-1,) + (1,) * (x.ndim - 1))


def gather_clients(tree: Any, ids: Array) -> Any:
    """Rows ``ids`` of every ``[K, ...]`` leaf: ``[C, ...]``."""
    return jax.tree.map(lambda x: x[ids], tree)


def scatter_clients(tree: Any, ids: Array, new: Any, keep: Array) -> Any:
    """``tree[ids] = new`` where ``keep`` (``[C]`` bool); every other row unchanged (leaves ``[K, ...]``)."""
    def put(p, x):
        old = p[ids]
        return p.at[ids].set(jnp.where(per_client(keep, x), x.astype(p.dtype), old))

    return jax.tree.map(put, tree, new)


# ----------------------------------------------------------------------------- distribute


def distribute_clients(algorithm, state: ServerState, masks: dict, own: Any) -> Any:
    """The start adapter of each client of the round (leaves ``[C, ...]``).

    Args:
      algorithm: an :class:`~fedlora_jax.algorithms.Algorithm` (its ``distribute`` or its
        aggregator's) or a bare ``Aggregator``.
      state: the server state.
      masks: ``{key: [C, R]}`` forward masks.
      own: the clients' per-client state (leaves ``[C, ...]``; ``()`` without).
    """
    distribute = as_algorithm(algorithm).distribute_fn()
    return jax.vmap(lambda m, o: distribute(state, m, o))(masks, own)


def client_start(algorithm, state: ServerState, masks: dict, client_id: int) -> Any:
    """What ONE client (``client_id``) receives from ``state`` under its forward ``masks``
    (``{key: [R]}``): the algorithm's distribute with the client's own per-client state."""
    own = jax.tree.map(lambda x: x[client_id], state.clients) if jax.tree.leaves(state.clients) else ()
    return as_algorithm(algorithm).distribute_fn()(state, masks, own)


# ----------------------------------------------------------------------------- screen


def tree_norm(tree: Any) -> Array:
    """Global L2 norm of a pytree, in float32."""
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros(())


def all_finite(tree: Any) -> Array:
    """Whether every entry of every leaf is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Screened(NamedTuple):
    """The clients' results as the aggregator sees them (leading ``C``).

    Attributes:
      lora, head: trained adapters and heads; a dropped client's replaced by its start point.
      weights: ``[C]`` aggregation weights actually used (0 = dropped or padding).
      norms: ``[C]`` adapter update norms (before clipping).
      finite: ``[C]`` bool, the client's adapter, head and loss are finite.
    """

    lora: Any
    head: Any
    weights: Array
    norms: Array
    finite: Array


def screen(outs, starts: Any, head0: Any, weights: Array, *, drop_nonfinite: bool = True,
           clip_update_norm: float | None = None) -> Screened:
    """Update norms, non-finite detection, optional norm clipping.

    Args:
      outs: the clients' :class:`~fedlora_jax.federated.ClientOutput` (leading ``C``).
      starts: the adapters they started from (leaves ``[C, ...]``).
      head0: the global head they started from (no ``C``).
      weights: ``[C]`` raw weights.
      drop_nonfinite: a client whose adapter, head or loss has NaN/inf gets weight 0 and its
        result is replaced by its start point (so ``0 * nan`` never reaches the average).
      clip_update_norm: clip each client's adapter update ``lora - start`` to this norm.
    """
    delta = jax.tree.map(lambda n, s: n.astype(jnp.float32) - s.astype(jnp.float32), outs.lora, starts)
    norms = jax.vmap(tree_norm)(delta)
    finite = jax.vmap(all_finite)((outs.lora, outs.head)) & jnp.isfinite(outs.loss)
    client_lora, client_head = outs.lora, outs.head
    if drop_nonfinite:
        weights = jnp.where(finite, weights, 0.0)
        client_lora = jax.tree.map(lambda x, s: jnp.where(per_client(finite, x), x, s.astype(x.dtype)),
                                   client_lora, starts)
        client_head = jax.tree.map(lambda x, s: jnp.where(per_client(finite, x), x, s[None]), client_head, head0)
    if clip_update_norm is not None:
        factor = jnp.minimum(1.0, clip_update_norm / jnp.maximum(norms, 1e-12))
        client_lora = jax.tree.map(
            lambda x, s: (s.astype(jnp.float32) + per_client(factor, x)
                          * (x.astype(jnp.float32) - s.astype(jnp.float32))).astype(x.dtype),
            client_lora, starts)
    return Screened(client_lora, client_head, weights, norms, finite)


# ----------------------------------------------------------------------------- aggregate


def weighted_mean(stacked: Any, weights: Array, fallback: Any) -> Any:
    """``sum_c w_c x_c / sum_c w_c`` leafwise (in ``promote(dtype, float32)``); ``fallback``
    when every weight is 0."""
    tot = jnp.sum(weights)
    w = weights / jnp.maximum(tot, 1e-30)

    def avg(x, old):
        cd = jnp.promote_types(x.dtype, jnp.float32)
        new = jnp.tensordot(w.astype(cd), x.astype(cd), axes=1).astype(x.dtype)
        return jnp.where(tot > 0, new, old)

    return jax.tree.map(avg, stacked, fallback)


def server_step(new: Any, old: Any, lr) -> Any:
    """``old + lr * (new - old)`` leafwise, in ``promote(dtype, float32)``."""
    def step(n, o):
        cd = jnp.promote_types(n.dtype, jnp.float32)
        return (o.astype(cd) + jnp.asarray(lr, cd) * (n.astype(cd) - o.astype(cd))).astype(n.dtype)

    return jax.tree.map(step, new, old)


def check_hyper(hyper: ServerHyper | None, aggregator) -> None:
    """Refuse server hyperparameters the round would ignore (host-side, before tracing)."""
    if hyper is None:
        return
    if not isinstance(hyper, ServerHyper):
        raise TypeError(f"hyper must be a ServerHyper or None, got {type(hyper).__name__}")
    if hyper.aggregation is not None and not aggregator.reads_hyper:
        raise ValueError(f"aggregator {aggregator.name!r} does not read server hyperparameters "
                         "(ServerHyper.aggregation would be ignored); use one whose reads_hyper is true, "
                         "e.g. mixed_padding")
    if hyper.server_lr is not None and jnp.ndim(hyper.server_lr) != 0:
        raise ValueError(f"ServerHyper.server_lr must be a scalar, got shape {jnp.shape(hyper.server_lr)}")


class ServerUpdate(NamedTuple):
    """What :func:`server_round_update` returns.

    Attributes:
      state: the next :class:`~fedlora_jax.federated.ServerState`.
      metrics: the round's metrics (the names the simulator logs): per client ``client_loss``,
        ``client_accuracy``, ``client_examples``, ``client_steps``, ``client_update_norm``,
        ``client_finite``, ``client_weight``, ``client_scores``; scalars ``train_loss``,
        ``train_accuracy``, ``num_dropped_nonfinite``.
      screened: the :class:`Screened` client results the aggregator saw.
      own: the clients' new per-client state (leaves ``[C, ...]``; ``()`` without).
    """

    state: ServerState
    metrics: dict
    screened: Screened
    own: Any


def server_round_update(algorithm, state: ServerState, outs, starts: Any, specs: ClientSpec, own: Any, *,
                        drop_nonfinite: bool = True, clip_update_norm: float | None = None,
                        hyper: ServerHyper | None = None, write_clients: bool = True) -> ServerUpdate:
    """Everything the server does with the clients' results: screen, aggregate, head FedAvg,
    server step, per-client state, the algorithm's server update, metrics. Jittable.

    Args:
      algorithm: an :class:`~fedlora_jax.algorithms.Algorithm` or a bare ``Aggregator``.
      state: the server state the clients started from.
      outs: their :class:`~fedlora_jax.federated.ClientOutput` (leading ``C``).
      starts: their start adapters (from :func:`distribute_clients`).
      specs: their stacked :class:`~fedlora_jax.federated.ClientSpec`; ``specs.weight`` are the
        raw aggregation weights (0 = padding / not taking part).
      own: their per-client state (from :func:`gather_clients`; ``()`` without).
      drop_nonfinite, clip_update_norm: see :func:`screen`.
      hyper: optional :class:`~fedlora_jax.federated.ServerHyper` (server learning rate;
        ``aggregation`` passed to the aggregator as ``extras["hyper"]``); check it with
        :func:`check_hyper` before tracing.
      write_clients: write the new per-client state into ``state.clients`` (``False`` when the
        caller keeps the population on the host and writes :attr:`ServerUpdate.own` itself).
    """
    algo = as_algorithm(algorithm)
    rule = algo.client_state
    scr = screen(outs, starts, state.head, specs.weight, drop_nonfinite=drop_nonfinite,
                 clip_update_norm=clip_update_norm)
    weights = scr.weights
    extras = {"scores": outs.scores} if algo.client.track_importance else {}
    if hyper is not None and hyper.aggregation is not None:
        extras["hyper"] = hyper.aggregation
    new_lora, new_agg = algo.aggregator.aggregate(state.lora, scr.lora, weights, specs.update_masks,
                                                  state.agg_state, extras=extras or None)
    new_head = weighted_mean(scr.head, weights, state.head)
    if hyper is not None and hyper.server_lr is not None:
        new_lora, new_head = server_step((new_lora, new_head), (state.lora, state.head), hyper.server_lr)
    new_clients, new_own = state.clients, ()
    if rule is not None:
        new_own = jax.vmap(rule.update)(own, outs._replace(lora=scr.lora, head=scr.head))
        if write_clients:
            new_clients = scatter_clients(state.clients, specs.client_id, new_own, weights > 0)
    next_round = state.round + 1
    new_algo = state.algo
    if algo.server_update is not None:
        new_algo = algo.server_update(state.algo, RoundOutputs(next_round, new_lora, new_agg, outs.scores, weights,
                                                               specs.masks, specs.update_masks))
    tot_w = jnp.maximum(jnp.sum(weights), 1e-30)
    metrics = {
        "client_loss": outs.loss,
        "client_accuracy": outs.correct / jnp.maximum(outs.count, 1.0),
        "client_examples": outs.count,
        "client_steps": outs.steps_done,
        "client_update_norm": scr.norms,
        "client_finite": scr.finite,
        "client_weight": weights,
        "train_loss": jnp.sum(weights * outs.loss) / tot_w,
        "train_accuracy": jnp.sum(outs.correct) / jnp.maximum(jnp.sum(outs.count), 1.0),
        "num_dropped_nonfinite": jnp.sum(~scr.finite & (specs.weight > 0)),
        "client_scores": outs.scores,
    }
    new_state = ServerState(next_round, new_lora, new_head, new_agg, new_algo, new_clients)
    return ServerUpdate(new_state, metrics, scr, new_own)


#: The scalar metrics of :func:`server_round_update` (what a deployment reports per round).
SCALAR_METRICS = ("train_loss", "train_accuracy", "num_dropped_nonfinite")


__all__ = ["SCALAR_METRICS", "Screened", "ServerUpdate", "all_finite", "as_algorithm", "check_hyper", "client_start",
           "distribute_clients", "effective_base", "gather_clients", "per_client", "scatter_clients", "screen",
           "server_round_update", "server_step", "tree_norm", "weighted_mean"]
