"""The ``Aggregator`` contract, the method registry and communication accounting.

An aggregator is a factory that closes over static hyperparameters and returns an
:class:`Aggregator` of pure functions (optax style)::

    agg = get_aggregator("fedit")
    state = agg.init(global_lora)
    new_global, state = agg.aggregate(global_lora, client_lora, weights, masks, state)
    start = jax.vmap(lambda m: agg.distribute(new_global, m, state))(masks)

Shapes (letters of ``docs/architecture.md``): ``global_lora[k] = LoraFactors(a [..., N, R],
b [..., R, M], e [..., R] | None)``; ``client_lora`` has a leading ``C`` on every leaf;
``weights [C]`` raw non-negative (normalised inside); ``masks[k] [C, ..., R]`` in {0, 1}.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.lora import LoraTree, MaskTree, count_params
from fedlora_jax.names import AGGREGATOR_ALIASES, normalize

Array = jax.Array

#: Tokens allowed in ``uplink_parts`` / ``downlink_parts``.
#: ``a``, ``b``, ``e``: that factor over the client's active slots (``e`` only if present);
#: ``scores``: one float per active slot (FedARA/HAFL triplet scores);
#: ``stack``: the factors of *every* client in the round, ``sum_j r_j (N + M)`` (FLoRA stack,
#: FedEx factored residual); ``dense``: an ``N x M`` matrix per module (merged update).
PART_TOKENS = ("a", "b", "e", "scores", "stack", "dense")


class Aggregator(NamedTuple):
    """Pure functions of one server aggregation method.

    Attributes:
      init: ``init(global_lora) -> state``.
      aggregate: ``aggregate(global_lora, client_lora, weights, masks, state, *, extras=None)
        -> (new_global, new_state)``; ``client_lora`` and ``masks`` stacked on ``C``.
      distribute: ``distribute(global_lora, masks, state, *, client_lora=None) -> LoraTree``
        for ONE client (``masks[k]: [..., R]``); vmappable over a client axis. ``client_lora``
        (that client's previous tree) is used only by methods with client-local factors
        (FedSA-LoRA keeps ``b`` local); every other method ignores it.
      uplink_parts: what a client sends (tokens of :data:`PART_TOKENS`).
      downlink_parts: what a client receives.
      name: registry name.
      reads_hyper: ``aggregate`` reads ``extras["hyper"]``, server hyperparameters passed as
        arrays by the round (:class:`~fedlora_jax.federated.ServerHyper`); the round refuses
        them for an aggregator that would ignore them.
    """

    init: Callable[..., Any]
    aggregate: Callable[..., tuple[LoraTree, Any]]
    distribute: Callable[..., LoraTree]
    uplink_parts: tuple[str, ...]
    downlink_parts: tuple[str, ...]
    name: str
    reads_hyper: bool = False


class EmptyState(NamedTuple):
    """State of stateless methods (FedIT, zero/replication padding, FFA/FedSA, FlexLoRA)."""


class BaseDeltaState(NamedTuple):
    """Cumulative dense update folded into the frozen base (FLoRA, FedEx-LoRA).

    Attributes:
      base_delta: ``{key: [..., N, M]}`` float32, kernel orientation, LoRA scale included.
        The round adds it to the base kernel: ``w_eff = w0 + base_delta``.
    """

    base_delta: dict[str, Array]


class ScoreState(NamedTuple):
    """Aggregated per-slot importance ``S_bar = sum_k p_k S^k`` (FedARA, HAFL).

    Attributes:
      scores: ``{key: [..., R]}`` float32 (float64 for float64 factors), input to the rank allocator.
    """

    scores: dict[str, Array]


# ---------------------------------------------------------------- registry

AGGREGATORS: dict[str, Callable[..., Aggregator]] = {}
#: Other name -> aggregator name: algorithm names and aliases, from the one table of method
#: names (:data:`fedlora_jax.names.METHODS`).
ALIASES: dict[str, str] = AGGREGATOR_ALIASES


def register(name: str) -> Callable[[Callable[..., Aggregator]], Callable[..., Aggregator]]:
    """Decorator: add a factory to :data:`AGGREGATORS` under ``name`` (other names for it go in
    :data:`fedlora_jax.names.METHODS`)."""

    def deco(factory):
        AGGREGATORS[name] = factory
        return factory

    return deco


def get_aggregator(name: str, **hparams) -> Aggregator:
    """Build a registered aggregator by name, e.g. ``get_aggregator("flexlora", split="sqrt")``;
    an algorithm's name gives its aggregator (``get_aggregator("hetlora")`` is ``zero_padding``).

    Raises:
      ValueError: unknown name (the message suggests the closest valid name).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = normalize(name)
    key = ALIASES.get(key, key)
    if key not in AGGREGATORS:
        valid = sorted(set(AGGREGATORS) | set(ALIASES))
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown aggregator {name!r}{hint} valid names: {valid}")
    return AGGREGATORS[key](**hparams)


# ---------------------------------------------------------------- input checks


def check_inputs(global_lora: LoraTree, client_lora: LoraTree, weights: Array,
                 masks: MaskTree) -> int:
    """Validate the shapes of an ``aggregate`` call (static shapes: safe under ``jit``).

    Returns:
      the number of clients ``C``.
    """
    if not global_lora:
        raise ValueError("global_lora is empty")
    if set(client_lora) != set(global_lora):
        raise ValueError(f"client_lora keys {sorted(client_lora)} != global_lora keys {sorted(global_lora)}")
    if set(masks) != set(global_lora):
        raise ValueError(f"masks keys {sorted(masks)} != global_lora keys {sorted(global_lora)}")
    w = jnp.asarray(weights)
    if w.ndim != 1:
        raise ValueError(f"weights must have shape [C], got {w.shape}")
    c = w.shape[0]
    for k, g in global_lora.items():
        f = client_lora[k]
        for part in ("a", "b"):
            gs, cs = getattr(g, part).shape, getattr(f, part).shape
            if cs != (c,) + gs:
                raise ValueError(f"module {k!r}: client {part} has shape {cs}, expected [C={c}] + {gs}")
        if (g.e is None) != (f.e is None):
            raise ValueError(f"module {k!r}: global e is {'None' if g.e is None else 'set'} but "
                             f"client e is {'None' if f.e is None else 'set'}")
        want = (c,) + g.a.shape[:-2] + (g.a.shape[-1],)
        if masks[k].shape != want:
            raise ValueError(f"module {k!r}: masks shape {masks[k].shape}, expected {want} ([C, ..., R])")
    return c


# ---------------------------------------------------------------- communication


def _part_params(part: str, n: int, m: int, ranks: Array, lead: int, has_e: bool,
                 client_dims: int) -> Array:
    """Params for one token of one module; ``ranks``: active slots ``[*client, *module]``."""
    if part == "a":
        per = ranks * n
    elif part == "b":
        per = ranks * m
    elif part == "e":
        per = ranks if has_e else jnp.zeros_like(ranks)
    elif part == "scores":
        per = ranks
    elif part == "stack":
        total = jnp.sum(ranks, axis=tuple(range(client_dims))) if client_dims else ranks
        return jnp.broadcast_to(jnp.sum(total) * (n + m), ranks.shape[:client_dims])
    elif part == "dense":
        return jnp.full(ranks.shape[:client_dims], lead * n * m, jnp.int32)
    else:
        raise ValueError(f"unknown part {part!r}; expected one of {PART_TOKENS}")
    return jnp.sum(per, axis=tuple(range(client_dims, per.ndim)))


def comm_params(aggregator: Aggregator, tree: LoraTree, masks: MaskTree | None = None, *,
                direction: str = "up") -> Array:
    """Parameters one client sends (``direction="up"``) or receives (``"down"``) per round.

    Args:
      aggregator: gives ``uplink_parts`` / ``downlink_parts`` (see :data:`PART_TOKENS`).
      tree: the global (unstacked) tree, used for ``N``, ``M``, module batch dims and ``e``.
      masks: ``{key: [*client, ..., R]}``; uplink: the slots each client trained and sends
        (the ``aggregate`` masks); downlink: the masks passed to ``distribute`` (HAFL: the
        forward mask, all ones). ``None`` = all ``R`` slots, one client.
      direction: ``"up"`` or ``"down"``.

    Returns:
      int32 array of shape ``[*client]`` (``[C]`` for stacked masks, ``[]`` for one client).
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    parts = aggregator.uplink_parts if direction == "up" else aggregator.downlink_parts
    total = jnp.asarray(0, jnp.int32)
    for k, f in tree.items():
        n, m, r = f.a.shape[-2], f.b.shape[-1], f.a.shape[-1]
        lead_shape = f.a.shape[:-2]
        mk = jnp.ones(lead_shape + (r,)) if masks is None else masks[k]
        client_dims = mk.ndim - 1 - len(lead_shape)
        if client_dims < 0 or mk.shape[client_dims:-1] != lead_shape:
            raise ValueError(f"module {k!r}: masks shape {mk.shape} does not end in {lead_shape + (r,)}")
        ranks = jnp.sum(mk != 0, axis=-1).astype(jnp.int32)
        for part in parts:
            if part in ("a", "b", "e") and not (part == "e" and f.e is None):
                # the library count for plain factor parts (validated against ours in tests)
                one = count_params({k: f}, {k: mk}, parts=(part,))
                total = total + jnp.sum(one, axis=tuple(range(client_dims, one.ndim)))
            else:
                total = total + _part_params(part, n, m, ranks, int(np.prod(lead_shape)), f.e is not None,
                                             client_dims)
    return total


def comm_bytes(aggregator: Aggregator, tree: LoraTree, masks: MaskTree | None = None, *,
               direction: str = "up", bytes_per_param: int | None = None) -> Array:
    """Bytes per client per round: :func:`comm_params` x ``bytes_per_param``.

    ``bytes_per_param`` defaults to the itemsize of the factors' storage dtype.
    """
    if bytes_per_param is None:
        bytes_per_param = jnp.dtype(next(iter(tree.values())).a.dtype).itemsize
    return comm_params(aggregator, tree, masks, direction=direction) * bytes_per_param


def comm_summary(aggregator: Aggregator, tree: LoraTree, up_masks: MaskTree | None,
                 down_masks: MaskTree | None = None, *,
                 bytes_per_param: int | None = None) -> dict[str, Array]:
    """``{"bytes_up": [C], "bytes_down": [C]}``; ``down_masks`` defaults to ``up_masks``."""
    down = up_masks if down_masks is None else down_masks
    return {"bytes_up": comm_bytes(aggregator, tree, up_masks, direction="up",
                                   bytes_per_param=bytes_per_param),
            "bytes_down": comm_bytes(aggregator, tree, down, direction="down",
                                     bytes_per_param=bytes_per_param)}


def round_bytes(aggregator: Aggregator, tree: LoraTree, head: Any, up_masks: MaskTree,
                down_masks: MaskTree, *, bytes_per_param: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bytes each client sends and receives in one round, head included (host NumPy).

    The one communication count of a run: the driver uses it for the simulated transfer
    times (deadlines) and for the logged metrics. Each client sends the parts named by
    ``aggregator.uplink_parts`` over its update masks plus the whole head, and receives
    ``downlink_parts`` over its forward masks plus the head.

    Args:
      aggregator: gives the parts.
      tree: the global adapter (unstacked).
      head: the trainable head pytree (every client sends and receives all of it).
      up_masks: ``{key: [C, R]}`` update masks (the slots each client trained).
      down_masks: ``{key: [C, R]}`` forward masks (the slots each client received).
      bytes_per_param: default the itemsize of the adapter's storage dtype.

    Returns:
      ``(bytes_up [C], bytes_down [C])`` float64.
    """
    if bytes_per_param is None:
        bytes_per_param = jnp.dtype(next(iter(tree.values())).a.dtype).itemsize
    head_params = sum(int(np.size(x)) for x in jax.tree.leaves(head))
    up = np.asarray(comm_params(aggregator, tree, up_masks, direction="up"), np.float64)
    down = np.asarray(comm_params(aggregator, tree, down_masks, direction="down"), np.float64)
    return bytes_per_param * (up + head_params), bytes_per_param * (down + head_params)


def check_parts(parts: Sequence[str], what: str) -> tuple[str, ...]:
    """Validate a parts tuple against :data:`PART_TOKENS`."""
    parts = tuple(parts)
    bad = [p for p in parts if p not in PART_TOKENS]
    if bad:
        raise ValueError(f"{what} contains unknown parts {bad}; expected tokens of {PART_TOKENS}")
    return parts


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_mapping(extras: Mapping | None) -> Mapping:
    """``extras`` or ``{}``; raise ``TypeError`` for a non-mapping."""
    if extras is None:
        return {}
    if not isinstance(extras, Mapping):
        raise TypeError(f"extras must be a dict or None, got {type(extras).__name__}")
    return extras
