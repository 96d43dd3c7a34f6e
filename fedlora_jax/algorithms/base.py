"""The algorithm interface: what a federated LoRA method tells the engine and the driver.

An algorithm is a factory ``build(ctx, **options) -> Algorithm`` (optax / fedjax style): it
closes over its static hyperparameters and returns an :class:`Algorithm`, a NamedTuple of
pure functions and static client options, built by keyword. The round engine
(:func:`fedlora_jax.federated.make_round`) and the driver read only these fields; they never
look at an algorithm's name.

Life of one round (host parts on the left, the one compiled round on the right)::

    plan(state, client_ids, round) -> ClientPlan      (host: masks for the sampled clients)
      driver: ClientSpec, simulated devices, bytes      |  distribute -> client_update (vmap)
                                                        |  aggregator.aggregate
                                                        |  client_state.update (per client id)
                                                        |  server_update(algo_state, outputs)
    observe(algo_state, report) -> algo_state          (host, optional: measured device times)

State lives in :class:`fedlora_jax.federated.ServerState`: ``algo`` (this algorithm's typed
state, a NamedTuple of arrays, checkpointed with the rest) and ``clients`` (population state
indexed by client id, leaves ``[K, ...]``, see :class:`ClientStateRule`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from fedlora_jax.aggregation.base import Aggregator
from fedlora_jax.lora import LoraTree, MaskTree

Array = jax.Array


class EmptyAlgoState(NamedTuple):
    """State of algorithms without server state (static-rank baselines)."""


class AlgoContext(NamedTuple):
    """Static facts an algorithm is built with (from the experiment config and the model).

    Attributes:
      keys: adapter keys ``"layer.{i}.{module}"``, sorted.
      layer_of_key: ``{key: layer}``.
      num_layers: ``L``.
      r_max: ``R``.
      client_ranks: ``[K]`` int rank budget of every client of the population.
      client_devices: ``[K]`` int device-profile index of every client.
      rounds: total rounds ``T``.
      scale: LoRA scale.
      aggregator_options: keyword options for the aggregator factory.
      seed: experiment seed (host-side randomness of plans: ``default_rng([seed, round, ...])``).
      device_profiles: the device profiles of the mix (LEGEND's configurator), or ``()``.
      model_shape: :class:`fedlora_jax.devices.ModelShape` of the model, or ``None``.
      batch_size: ``B`` (cost model).
      local_steps: ``S`` (cost model).
      deadline_s: round deadline in seconds, or ``None``.
    """

    keys: tuple[str, ...]
    layer_of_key: Mapping[str, int]
    num_layers: int
    r_max: int
    client_ranks: np.ndarray
    client_devices: np.ndarray
    rounds: int
    scale: float
    aggregator_options: Mapping[str, Any] = {}
    seed: int = 0
    device_profiles: tuple = ()
    model_shape: Any = None
    batch_size: int = 1
    local_steps: int = 1
    deadline_s: float | None = None

    @property
    def num_clients(self) -> int:
        """``K``, the population size."""
        return int(len(self.client_ranks))


class ClientPlan(NamedTuple):
    """What the sampled clients do in a round (host NumPy arrays, fixed shapes).

    Attributes:
      masks: forward masks ``{key: [C, R]}`` (LoRA depth folded in).
      update_masks: slots each client trains and sends ``{key: [C, R]}``.
      depth_mask: ``[C, L]`` or ``None`` (derived from the masks).
      global_masks: ``{key: [R]}`` one mask shared by every client, or ``None``. When set, the
        forward uses it unbatched, so a module whose mask is all zero skips its adapter
        matmul (FedARA's module pruning); ``masks`` must then equal it broadcast over ``C``.
    """

    masks: MaskTree
    update_masks: MaskTree
    depth_mask: np.ndarray | None = None
    global_masks: MaskTree | None = None


class ClientOptions(NamedTuple):
    """Static options of every client's local training (part of the compiled program).

    Attributes:
      track_importance: keep AdaLoRA EMAs of ``|w * g|`` during local training and return
        triplet scores ``{key: [R]}`` (unmasked: frozen and pruned slots are scored too).
      beta1: EMA factor of the sensitivity ``Ibar``.
      beta2: EMA factor of the uncertainty ``Ubar``.
      uncertainty: scores ``Ibar * Ubar`` (AdaLoRA) if True, ``Ibar`` alone (smoothed
        sensitivity) if False.
      regularizer: ``(lora, masks, round) -> scalar`` added to the loss, or ``None``.
      frozen_parts: factors no client ever updates, e.g. ``("a",)`` (FFA-LoRA).
      update_scale: ``(("e", 10.0),)``: per-factor multipliers of the optimizer's updates
        (a per-factor learning rate, e.g. for the SVD form's ``lambda``).
    """

    track_importance: bool = False
    beta1: float = 0.85
    beta2: float = 0.85
    uncertainty: bool = True
    regularizer: Callable | None = None
    frozen_parts: tuple[str, ...] = ()
    update_scale: tuple[tuple[str, float], ...] = ()


class ClientStateRule(NamedTuple):
    """Population state indexed by client id: one engine feature for every per-client history.

    The engine gathers ``clients[client_id]`` for each sampled client, hands it to
    ``Algorithm.distribute`` and, after local training, stores ``update(old, out)`` back for
    the clients that took part (weight > 0).

    Attributes:
      init: ``init(lora0, num_clients) -> pytree`` with leaves ``[K, ...]``.
      update: ``update(old, out) -> new`` for ONE client, where ``old`` is its gathered state
        and ``out`` its :class:`fedlora_jax.federated.ClientOutput` (vmapped by the engine).
    """

    init: Callable[[LoraTree, int], Any]
    update: Callable[[Any, Any], Any]


class RoundOutputs(NamedTuple):
    """What ``server_update`` sees after aggregation, inside the jit.

    Attributes:
      round: int32 index of the round about to start (the finished round + 1).
      lora: the new global adapter.
      agg_state: the aggregator's new state (e.g. smoothed ``ScoreState.scores``).
      client_scores: ``{key: [C, R]}`` triplet scores (``{}`` without importance tracking).
      weights: ``[C]`` aggregation weights actually used (0 = dropped).
      masks: ``{key: [C, R]}`` forward masks of the round.
      update_masks: ``{key: [C, R]}`` update masks of the round.
    """

    round: Array
    lora: LoraTree
    agg_state: Any
    client_scores: dict
    weights: Array
    masks: MaskTree
    update_masks: MaskTree


class RoundReport(NamedTuple):
    """What the sampled devices report after a round (host; measured, or simulated).

    Attributes:
      client_ids, device_ids: ``[C]`` int.
      participated: ``[C]`` bool (reported a result).
      flops, compute_s: ``[C]`` local work and the time it took.
      bytes_up, up_s, bytes_down, down_s: ``[C]`` payloads and their transfer times.
    """

    client_ids: np.ndarray
    device_ids: np.ndarray
    participated: np.ndarray
    flops: np.ndarray
    compute_s: np.ndarray
    bytes_up: np.ndarray
    up_s: np.ndarray
    bytes_down: np.ndarray
    down_s: np.ndarray


def default_distribute(aggregator: Aggregator):
    """``distribute(state, masks, client_state)`` that asks the aggregator (ignores client state)."""

    def distribute(state, masks, client_state):
        del client_state
        return aggregator.distribute(state.lora, masks, state.agg_state)

    return distribute


class Algorithm(NamedTuple):
    """One federated LoRA method (build it by keyword).

    Attributes:
      name: registry name (reporting only; nothing branches on it).
      aggregator: the server's :class:`fedlora_jax.aggregation.Aggregator`.
      plan: ``plan(state, client_ids [C], round) -> ClientPlan`` on the host, or ``None``
        (a caller that builds its own ``ClientSpec``).
      init_scheme: adapter init passed to :func:`fedlora_jax.lora.init`.
      client: :class:`ClientOptions` of local training.
      init: ``init(lora0) -> algo_state`` (a NamedTuple of arrays).
      server_update: ``server_update(algo_state, RoundOutputs) -> algo_state`` inside the
        jit after aggregation, or ``None`` (state unchanged).
      client_state: :class:`ClientStateRule` or ``None`` (no per-client state).
      distribute: ``distribute(state, masks, client_state) -> LoraTree`` for ONE client:
        its start adapter (``masks``: its forward masks ``{key: [R]}``); ``None`` asks the
        aggregator.
      eval_masks: ``eval_masks(algo_state) -> MaskTree | None`` masks of the global model
        at evaluation (FedARA's ``z``); ``None`` = all slots.
      observe: ``observe(algo_state, RoundReport) -> algo_state`` on the host after the
        round (LEGEND's capacity estimates), or ``None``.
      static_cut: the driver compiles one round per lowest active layer so that the backward
        pass below it is removed statically (FedARA ``static_cut``).
      options: the resolved hyperparameters (for the run's record).
    """

    name: str
    aggregator: Aggregator
    plan: Callable[[Any, np.ndarray, int], ClientPlan] | None = None
    init_scheme: str = "a_random_b_zero"
    client: ClientOptions = ClientOptions()
    init: Callable[[LoraTree], Any] = lambda lora: EmptyAlgoState()
    server_update: Callable[[Any, RoundOutputs], Any] | None = None
    client_state: ClientStateRule | None = None
    distribute: Callable | None = None
    eval_masks: Callable[[Any], MaskTree | None] = lambda algo_state: None
    observe: Callable[[Any, RoundReport], Any] | None = None
    static_cut: bool = False
    options: Mapping[str, Any] = {}

    def distribute_fn(self):
        """The effective ``distribute(state, masks, client_state)``."""
        return self.distribute if self.distribute is not None else default_distribute(self.aggregator)


# ----------------------------------------------------------------------------- helpers


def prefix_plan_masks(ranks: np.ndarray, r_max: int) -> np.ndarray:
    """``[C, R]`` float32 prefix masks ``m[c, i] = i < ranks[c]`` (host NumPy)."""
    ranks = np.asarray(ranks)
    return (np.arange(r_max)[None, :] < ranks[:, None]).astype(np.float32)


def prefix_plan(ctx: AlgoContext):
    """``plan`` of static-rank methods: every client trains the prefix of its rank."""

    def plan(state, client_ids, round_idx):
        del state, round_idx
        m = prefix_plan_masks(ctx.client_ranks[np.asarray(client_ids)], ctx.r_max)
        masks = {k: m for k in ctx.keys}
        return ClientPlan(masks, masks)

    return plan


def static_rank(name: str, aggregator: Aggregator, ctx: AlgoContext, **fields) -> Algorithm:
    """A method whose clients train their fixed-rank prefix every round (FedIT, HetLoRA, ...)."""
    return Algorithm(name=name, aggregator=aggregator, plan=prefix_plan(ctx), **fields)


def from_aggregator(aggregator: Aggregator) -> Algorithm:
    """Wrap a bare aggregator as an algorithm without a plan (callers build the specs)."""
    return Algorithm(name=getattr(aggregator, "name", "aggregator"), aggregator=aggregator)


def build_options(build: Callable, options: Mapping[str, Any], name: str) -> dict:
    """Check ``options`` against the keyword-only parameters of ``build`` (the schema).

    Raises:
      ValueError: an unknown option, with the allowed ones and the closest match.
    """
    import difflib

    params = inspect.signature(build).parameters
    allowed = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(options) - set(allowed))
    if bad:
        close = difflib.get_close_matches(bad[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"algorithm {name!r}: unknown option(s) {bad}{hint}; allowed: {allowed or 'none'}")
    return dict(options)


def option_defaults(build: Callable) -> dict:
    """``{option: default}`` of an algorithm factory (its keyword-only parameters)."""
    params = inspect.signature(build).parameters
    return {p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
