"""Gradients through whole federated rounds with respect to server hyperparameters.

A round (:func:`~fedlora_jax.federated.make_round`) is a pure function of its inputs, so a
validation loss after one or several rounds is differentiable with respect to

- the per-client aggregation weights ``ClientSpec.weight [C]`` (e.g. learned population
  weights gathered by client id: :func:`with_client_weights`),
- a server learning rate / mixing coefficient ``ServerHyper.server_lr``,
- the aggregator's own array hyperparameters ``ServerHyper.aggregation`` (for
  ``mixed_padding``: per-slot interpolation between zero and replication padding and
  per-client per-slot weights, :class:`~fedlora_jax.aggregation.PaddingHyper`).

Through one round the gradient flows through the aggregation only (the clients trained
before it). Through two or more rounds it also flows through every later client's local
training (second order through the inner optimizer): use an optimizer that is smooth at
zero gradients (``optax.adam(..., eps_root=1e-12)``, or SGD; plain Adam's
``sqrt(nu)`` has an infinite derivative where a gradient is exactly zero, e.g. a masked
slot) and ``remat=True`` to keep only each round's inputs for the backward pass.

Example (two rounds, gradient of a held-out loss)::

    def val_after(theta):
        hyper = ServerHyper(server_lr=jnp.exp(theta["log_lr"]))
        rounds = [RoundInputs(b, with_client_weights(s, jnp.exp(theta["w"])), k) for b, s, k in data]
        state, _ = run_rounds(round_fn, state0, rounds, base, hyper, remat=True)
        return val_loss(state)

    g = jax.grad(val_after)(theta)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.federated.round import RoundFn, check_hyper, check_round_inputs
from fedlora_jax.federated.spec import ClientSpec, ServerHyper, ServerState

Array = jax.Array


class RoundInputs(NamedTuple):
    """What one round consumes: ``batches`` (leaves ``[C, S, B, ...]``), stacked ``specs``
    and the round ``key``."""

    batches: Any
    specs: ClientSpec
    key: Array


def with_client_weights(specs: ClientSpec, population_weights: Array) -> ClientSpec:
    """``specs`` with ``weight = specs.weight * population_weights[client_id]``.

    ``population_weights [K]`` (non-negative, e.g. ``exp`` or ``softmax`` of learned logits):
    one weight per client of the population, gathered for the clients of this round, so the
    same parameters serve every round's sample. Differentiable in ``population_weights``.
    """
    w = jnp.asarray(population_weights)
    if w.ndim != 1:
        raise ValueError(f"population_weights must be [K], got shape {w.shape}")
    return specs._replace(weight=specs.weight * w[specs.client_id])


def run_rounds(round_fn: RoundFn, state: ServerState, rounds: Sequence[RoundInputs], base: Any,
               hyper: ServerHyper | None = None, *, remat: bool = False,
               hyper_per_round: Sequence[ServerHyper | None] | None = None) -> tuple[ServerState, list[dict]]:
    """Unroll ``len(rounds)`` rounds from ``state``; differentiable end to end.

    Args:
      round_fn: from :func:`~fedlora_jax.federated.make_round` (built with ``donate=False``).
      state: the server state before the first round.
      rounds: one :class:`RoundInputs` per round.
      base: frozen model parameters.
      hyper: server hyperparameters used in every round (or ``None``).
      remat: ``jax.checkpoint`` each round: the backward pass keeps each round's inputs only
        and recomputes its forward (memory of one round instead of all of them).
      hyper_per_round: alternatively one ``ServerHyper`` per round (excludes ``hyper``).

    Returns:
      ``(state, metrics)``: the final state and each round's metrics dict.
    """
    if not isinstance(round_fn, RoundFn):
        raise TypeError(f"round_fn must be a RoundFn from make_round, got {type(round_fn).__name__}")
    if round_fn.host_client_state:
        raise ValueError("run_rounds needs the per-client state on the device (client_state_on_host=False): "
                         "host-side state is written in place, outside autodiff")
    if round_fn.donates:
        raise ValueError("run_rounds needs a round built with donate=False (donated buffers cannot be "
                         "differentiated through or reused)")
    rounds = list(rounds)
    if not rounds:
        raise ValueError("rounds is empty: give at least one RoundInputs")
    if hyper_per_round is not None:
        if hyper is not None:
            raise ValueError("give either hyper or hyper_per_round, not both")
        hypers = list(hyper_per_round)
        if len(hypers) != len(rounds):
            raise ValueError(f"hyper_per_round has {len(hypers)} entries for {len(rounds)} rounds")
    else:
        hypers = [hyper] * len(rounds)
    for inp, hp in zip(rounds, hypers, strict=True):
        if not isinstance(inp, RoundInputs):
            raise TypeError(f"each round must be a RoundInputs, got {type(inp).__name__}")
        check_round_inputs(state, inp.specs)
        check_hyper(hp, round_fn.algorithm.aggregator)

    step: Callable = round_fn.jitted
    if remat:
        step = jax.checkpoint(step)
    metrics = []
    for inp, hp in zip(rounds, hypers, strict=True):
        state, m = step(state, inp.batches, inp.specs, inp.key, base, hp)
        metrics.append(m)
    return state, metrics
