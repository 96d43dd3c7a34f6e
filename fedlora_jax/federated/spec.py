"""Per-client specification and server state: arrays only, so nothing here recompiles.

A :class:`ClientSpec` describes what each sampled client does in a round. Every field is an
array stacked on the client axis ``C``; ranks, depths, frozen components and step counts
are *data*, so one compiled round serves every rank pattern.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.lora import LoraTree, MaskTree

Array = jax.Array


class ClientSpec(NamedTuple):
    """What each client of a round does. Leading axis ``C`` on every leaf.

    Attributes:
      masks: forward rank masks ``{key: [C, R]}`` (LoRA depth folded in: a layer outside the
        client's depth has an all-zero mask).
      update_masks: slots each client trains and sends ``{key: [C, R]}`` (HAFL freezing:
        forward mask all ones, update mask = its top components). Usually equal to ``masks``.
      depth_mask: ``[C, L]`` 1 where the layer carries an adapter (reported; folded in masks).
      grad_cut: ``[C]`` int32, lowest layer that needs a gradient (no backward below it).
      num_steps: ``[C]`` int32 valid local steps (``<= S``); steps past it are exact no-ops.
      weight: ``[C]`` float32 aggregation weight (e.g. example count); 0 = not aggregated.
      client_id: ``[C]`` int32 global client index (keys are derived from it, not position).
      device_id: ``[C]`` int32 index into the device profile table (cost model).
      global_masks: ``{key: [R]}`` one forward mask shared by every client (no client axis),
        or ``None``. When set, the forward uses it unbatched, so a module whose mask is all
        zero skips its adapter matmul (FedARA module pruning); ``masks`` equals it broadcast.
    """

    masks: MaskTree
    update_masks: MaskTree
    depth_mask: Array
    grad_cut: Array
    num_steps: Array
    weight: Array
    client_id: Array
    device_id: Array
    global_masks: MaskTree | None = None


class ServerState(NamedTuple):
    """Global state carried from round to round (arrays only; checkpointed as a whole).

    Attributes:
      round: int32 scalar, index of the next round.
      lora: global adapter tree (``[N, R]``/``[R, M]`` leaves, no client axis).
      head: global trainable head pytree (classifier), or ``{}``.
      agg_state: the aggregator's state (e.g. ``base_delta`` for FedEx-LoRA / FLoRA).
      algo: the algorithm's typed state (e.g. ``FedaraState(z)``), see
        :class:`fedlora_jax.algorithms.Algorithm`.
      clients: population state indexed by client id (leaves ``[K, ...]``: FedSA-LoRA's local
        adapters, HAFL's score history), or ``()``.
    """

    round: Array
    lora: LoraTree
    head: Any
    agg_state: Any
    algo: Any = ()
    clients: Any = ()


class ServerHyper(NamedTuple):
    """Server-side hyperparameters of a round passed as arrays, so ``jax.grad`` reaches them.

    Give one to ``round_fn(..., hyper=ServerHyper(...))``; differentiate a loss of the round's
    output with respect to it (:mod:`fedlora_jax.federated.hypergrad`). The per-client
    aggregation weights are already arrays: ``ClientSpec.weight``.

    Attributes:
      server_lr: ``[]`` server step ``eta`` (FedAvg with server momentum-free mixing):
        ``new = prev + eta * (aggregate - prev)`` on the adapter and the head; ``None`` = 1
        (the aggregator's output as is).
      aggregation: handed to the aggregator as ``extras["hyper"]`` (e.g.
        :class:`~fedlora_jax.aggregation.PaddingHyper` for ``mixed_padding``), or ``None``.
        Refused for an aggregator whose ``reads_hyper`` is false (it would be ignored).
    """

    server_lr: Any = None
    aggregation: Any = None


def num_clients(spec: ClientSpec) -> int:
    """Static number of clients ``C`` in a stacked spec."""
    return int(spec.weight.shape[0])


def make_spec(
    masks: MaskTree,
    *,
    num_steps,
    weight,
    client_id,
    num_layers: int,
    update_masks: MaskTree | None = None,
    depth_mask=None,
    grad_cut=None,
    device_id=None,
    layer_of_key: dict[str, int] | None = None,
    global_masks: MaskTree | None = None,
) -> ClientSpec:
    """Build and validate a :class:`ClientSpec` on the host.

    Args:
      masks: ``{key: [C, R]}`` forward masks (NumPy or jax arrays).
      num_steps, weight, client_id: ``[C]`` arrays.
      num_layers: ``L``.
      update_masks: defaults to ``masks``.
      depth_mask: ``[C, L]``; default: a layer is "on" where any of its modules has rank > 0
        (needs ``layer_of_key``), else all ones.
      grad_cut: ``[C]``; default: the lowest layer with an active module (``L`` if none).
      device_id: ``[C]``; default zeros.
      layer_of_key: ``{key: layer index}`` used for the defaults above.
      global_masks: ``{key: [R]}`` one forward mask for every client (see
        :class:`ClientSpec`); ``masks`` must equal it broadcast over ``C``.

    Raises:
      ValueError: on inconsistent client counts, negative steps or weights, bad masks.
    """
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 1:
        raise ValueError(f"weight must be [C], got shape {weight.shape}")
    c = weight.shape[0]
    if c < 1:
        raise ValueError("a round needs at least one client (C >= 1)")
    if np.any(weight < 0) or not np.all(np.isfinite(weight)):
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    num_steps = np.asarray(num_steps, np.int32)
    client_id = np.asarray(client_id, np.int32)
    for name, arr in (("num_steps", num_steps), ("client_id", client_id)):
        if arr.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {arr.shape}")
    if np.any(num_steps < 0):
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    masks = {k: np.asarray(v, np.float32) for k, v in masks.items()}
    for k, v in masks.items():
        if v.ndim != 2 or v.shape[0] != c:
            raise ValueError(f"masks[{k!r}] must be [C={c}, R], got {v.shape}")
        if not np.all((v == 0) | (v == 1)):
            raise ValueError(f"masks[{k!r}] must hold only 0/1")
    update_masks = masks if update_masks is None else {
        k: np.asarray(v, np.float32) for k, v in update_masks.items()}
    if set(update_masks) != set(masks):
        raise ValueError("update_masks and masks must have the same keys")
    for k, v in update_masks.items():
        if v.shape != masks[k].shape or not np.all((v == 0) | (v == 1)):
            raise ValueError(f"update_masks[{k!r}] must be 0/1 of shape {masks[k].shape}, got {v.shape}")
    if global_masks is not None:
        global_masks = {k: np.asarray(v, np.float32) for k, v in global_masks.items()}
        if set(global_masks) != set(masks):
            raise ValueError("global_masks and masks must have the same keys")
        for k, v in global_masks.items():
            if v.shape != masks[k].shape[1:]:
                raise ValueError(f"global_masks[{k!r}] must be [R={masks[k].shape[1]}], got {v.shape}")
            if not np.array_equal(np.broadcast_to(v, masks[k].shape), masks[k]):
                raise ValueError(f"masks[{k!r}] must equal global_masks[{k!r}] broadcast over the clients")
    active_layers = np.zeros((c, num_layers), np.float32)
    if layer_of_key is not None:
        for k, v in masks.items():
            active_layers[:, layer_of_key[k]] = np.maximum(active_layers[:, layer_of_key[k]],
                                                            (v.sum(-1) > 0).astype(np.float32))
    if depth_mask is None:
        depth_mask = active_layers if layer_of_key is not None else np.ones((c, num_layers), np.float32)
    depth_mask = np.asarray(depth_mask, np.float32)
    if depth_mask.shape != (c, num_layers):
        raise ValueError(f"depth_mask must be [C={c}, L={num_layers}], got {depth_mask.shape}")
    if grad_cut is None:
        on = active_layers if layer_of_key is not None else depth_mask
        grad_cut = np.where(on.any(-1), on.argmax(-1), num_layers)
    grad_cut = np.asarray(grad_cut, np.int32)
    device_id = np.zeros((c,), np.int32) if device_id is None else np.asarray(device_id, np.int32)
    return ClientSpec(masks=masks, update_masks=update_masks, depth_mask=depth_mask,
                      grad_cut=grad_cut, num_steps=num_steps, weight=weight,
                      client_id=client_id, device_id=device_id, global_masks=global_masks)


def pad_clients(tree: Any, c_pad: int) -> Any:
    """Pad every leaf's leading axis from ``C`` to ``c_pad`` by repeating client 0.

    Used with zero weight and zero steps for the padding clients, so they are exact no-ops.
    """

    def pad(x):
        c = x.shape[0]
        if c == c_pad:
            return x
        reps = jnp.broadcast_to(x[:1], (c_pad - c,) + x.shape[1:])
        return jnp.concatenate([x, reps], axis=0)

    return jax.tree.map(pad, tree)
