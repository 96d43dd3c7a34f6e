"""Cost model of one client round: FLOPs, memory, bytes, simulated time and energy.

Inputs are arrays so the model runs inside the jitted round (``jnp``) or on the host (NumPy,
e.g. LEGEND's configurator): every function works on NumPy or JAX arrays and returns the
same kind. A client's adapter enters as **active ranks** ``ranks [..., L, P]`` (int, ``P`` =
adapted module types per layer, in :attr:`ModelShape.modules` order; see
:func:`ranks_from_masks`) and a **gradient cut** ``cut [...]`` (the lowest layer that gets a
backward pass; ``0`` = full backward, ``L`` = none; LEGEND depth ``d`` is ``cut = L - d``).

Per sample per local step, with ``T`` tokens, ``H`` hidden, ``F`` intermediate,
``W = 4 H^2 + f H F`` frozen matmul weights per layer (``f`` = FFN matrices, 2 or 3),
``A_l = sum_p r_{l,p} (N_p + M_p)`` active LoRA weights of layer ``l``::

    forward   = sum_{l<L} (2 T W + 4 T^2 H)  + 2 T sum_l A_l                    + head
    backward  = sum_{l>=cut} (2 T W + 8 T^2 H + 4 T A_l)                        + head_bwd
    flops     = steps * batch * (forward + backward)

* frozen matmuls: backward needs only the activation gradient ``dX = dY W^T`` (1x forward);
* attention ``QK^T`` and ``PV`` (activation x activation): gradients for both operands (2x);
* LoRA ``(x a) b``: weight grads for ``a`` and ``b`` plus the activation grads (2x forward);
* head: ``2 T H V`` per sample for a causal LM (frozen, tied), ``2 * head_params`` for a
  classifier on one pooled token; backward = input grad if ``cut < L`` + weight grad if
  ``head_params > 0``.
* ignored (< a few %): embeddings lookup, layer norms, softmax, activations, biases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.devices.profiles import DeviceArrays, DeviceProfile

Array = jax.Array


def _xp(*xs):
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


@dataclass(frozen=True)
class ModelShape:
    """Static shape of a transformer for the cost model.

    Attributes:
      num_layers: ``L``.
      hidden: ``H``.
      intermediate: ``F`` (FFN width).
      heads: attention heads (attention-score activation memory).
      vocab: ``V``.
      seq_len: ``T`` tokens per sample.
      modules: adapted module types per layer, ``((name, N, M), ...)`` (a mapping
        ``{name: (N, M)}`` is accepted and sorted by name); order defines ``P``.
      num_labels: classifier outputs (encoders).
      causal_lm: True for a decoder with an LM head over ``V`` per token.
      ffn_matrices: 2 (GELU MLP) or 3 (SwiGLU).
      head_params: trainable head parameters; ``None`` -> ``H * num_labels + num_labels`` for
        a classifier, 0 for a causal LM (frozen tied head).
    """

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    seq_len: int
    modules: tuple = field(default=())
    num_labels: int = 2
    causal_lm: bool = False
    ffn_matrices: int = 2
    head_params: int | None = None

    def __post_init__(self):
        mods = self.modules
        if isinstance(mods, Mapping):
            mods = tuple((k, int(v[0]), int(v[1])) for k, v in sorted(mods.items()))
        else:
            mods = tuple((str(n), int(a), int(b)) for n, a, b in mods)
        object.__setattr__(self, "modules", mods)
        for f in ("num_layers", "hidden", "intermediate", "heads", "vocab", "seq_len"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ModelShape.{f} must be an int >= 1, got {v!r}")
        if not mods:
            raise ValueError("ModelShape.modules is empty: give the adapted (name, N, M) per layer")
        if self.ffn_matrices not in (2, 3):
            raise ValueError(f"ffn_matrices must be 2 or 3, got {self.ffn_matrices!r}")
        if self.head_params is None:
            hp = 0 if self.causal_lm else self.hidden * self.num_labels + self.num_labels
            object.__setattr__(self, "head_params", hp)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.modules)

    @property
    def n_in(self) -> np.ndarray:
        """``[P]`` in-features."""
        return np.array([n for _, n, _ in self.modules], np.float64)

    @property
    def n_out(self) -> np.ndarray:
        """``[P]`` out-features."""
        return np.array([m for _, _, m in self.modules], np.float64)

    @property
    def layer_weights(self) -> int:
        """``W = 4 H^2 + f H F``: frozen matmul weights of one layer."""
        return 4 * self.hidden**2 + self.ffn_matrices * self.hidden * self.intermediate

    @property
    def base_params(self) -> int:
        """Frozen parameters ``V H + T H + L W`` (embeddings, positions, layers; biases/LN ignored)."""
        return (self.vocab * self.hidden + self.seq_len * self.hidden
                + self.num_layers * self.layer_weights)


def ranks_from_masks(masks: Mapping[str, Array], shape: ModelShape, *,
                     key_format: str = "layer.{layer}.{module}") -> Array:
    """Active ranks ``[..., L, P]`` (int32) from a mask tree; absent modules count 0.

    Args:
      masks: ``{key: [..., R]}`` with keys ``key_format.format(layer=l, module=name)``.
      shape: the :class:`ModelShape`.
      key_format: how keys are built.
    """
    expect = {key_format.format(layer=l, module=n): (l, p)
              for l in range(shape.num_layers) for p, n in enumerate(shape.module_names)}
    unknown = sorted(set(masks) - set(expect))
    if unknown:
        raise ValueError(f"mask keys {unknown[:5]} do not match {key_format!r} over "
                         f"modules {shape.module_names} and {shape.num_layers} layers")
    lead = jnp.shape(next(iter(masks.values())))[:-1] if masks else ()
    zero = jnp.zeros(lead, jnp.int32)
    rows = []
    for l in range(shape.num_layers):
        row = []
        for n in shape.module_names:
            m = masks.get(key_format.format(layer=l, module=n))
            row.append(zero if m is None else jnp.sum(m != 0, axis=-1).astype(jnp.int32))
        rows.append(jnp.stack(row, axis=-1))
    return jnp.stack(rows, axis=-2)


def _check_ranks(ranks, shape: ModelShape):
    s = np.shape(ranks)
    if s[-2:] != (shape.num_layers, len(shape.modules)):
        raise ValueError(f"ranks must have shape [..., L={shape.num_layers}, "
                         f"P={len(shape.modules)}], got {s}")


def lora_params(ranks, shape: ModelShape, *, parts: Sequence[str] = ("a", "b")):
    """Active LoRA parameters ``sum_{l,p} r_{l,p} (N_p [a] + M_p [b] + 1 [e])``, ``[...]``."""
    _check_ranks(ranks, shape)
    bad = set(parts) - {"a", "b", "e"}
    if bad:
        raise ValueError(f"parts must be a subset of ('a', 'b', 'e'), got {tuple(parts)}")
    xp = _xp(ranks)
    per = (shape.n_in * ("a" in parts) + shape.n_out * ("b" in parts)
           + 1.0 * ("e" in parts))
    return xp.sum(xp.asarray(ranks) * per.astype(np.float32), axis=(-2, -1))


def _trained_layers(cut, shape: ModelShape, xp):
    """``[..., L]`` 1.0 where layer ``l >= cut``."""
    c = xp.asarray(cut)
    return (xp.arange(shape.num_layers) >= c[..., None]).astype(np.float32)


def _head_fwd(shape: ModelShape) -> float:
    if shape.causal_lm:
        return 2.0 * shape.seq_len * shape.hidden * shape.vocab
    return 2.0 * shape.head_params


def client_flops(ranks, cut, shape: ModelShape, *, batch: int, steps: int):
    """Training FLOPs of one client round (formula in the module docstring).

    Args:
      ranks: ``[..., L, P]`` active ranks.
      cut: ``[...]`` lowest layer with a backward pass (``L - depth``).
      shape: :class:`ModelShape`.
      batch: ``B`` samples per step.
      steps: ``S`` local steps.

    Returns:
      ``[...]`` float32 FLOPs.
    """
    _check_ranks(ranks, shape)
    xp = _xp(ranks, cut)
    T, H, L = shape.seq_len, shape.hidden, shape.num_layers
    r = xp.asarray(ranks).astype(np.float32)
    a_l = xp.sum(r * (shape.n_in + shape.n_out).astype(np.float32), axis=-1)       # [..., L]
    trained = _trained_layers(cut, shape, xp)                                        # [..., L]
    n_trained = xp.sum(trained, axis=-1)
    head = _head_fwd(shape)
    fwd = L * (2.0 * T * shape.layer_weights + 4.0 * T * T * H) + 2.0 * T * xp.sum(a_l, -1) + head
    bwd = (n_trained * (2.0 * T * shape.layer_weights + 8.0 * T * T * H)
           + 4.0 * T * xp.sum(a_l * trained, axis=-1))
    head_bwd = head * (n_trained > 0) + (head if shape.head_params > 0 else 0.0)
    return (float(steps * batch) * (fwd + bwd + head_bwd)).astype(np.float32)


def client_memory(ranks, cut, shape: ModelShape, *, batch: int, weight_bytes: int = 2,
                  act_bytes: int = 2, param_bytes: int = 4, optimizer_slots: int = 2):
    """Peak training memory (bytes) of one client.

    ``weights + activations + trainable state`` where
    ``weights = base_params * weight_bytes``;
    ``activations = (n_trained + 1) * B T H (34 + 5 heads T / H) * act_bytes / 2
    + B T sum_{trained l} sum_p r_{l,p} * act_bytes`` (per-layer stash of Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", for the layers
    that get a backward pass, plus one layer of forward working set, plus the LoRA ``x a``);
    ``trainable = (lora_params(a, b, e) + head_params) * param_bytes * (2 + optimizer_slots)``
    (weights, gradients, optimizer moments; Adam: 2 slots).

    Returns:
      ``[...]`` float32 bytes.
    """
    _check_ranks(ranks, shape)
    xp = _xp(ranks, cut)
    T, H = shape.seq_len, shape.hidden
    trained = _trained_layers(cut, shape, xp)
    r = xp.asarray(ranks).astype(np.float32)
    per_layer = batch * T * H * (34.0 + 5.0 * shape.heads * T / H) * act_bytes / 2.0
    acts = (xp.sum(trained, -1) + 1.0) * per_layer
    acts = acts + batch * T * act_bytes * xp.sum(xp.sum(r, -1) * trained, -1)
    state = ((lora_params(ranks, shape, parts=("a", "b", "e")) + shape.head_params)
             * param_bytes * (2.0 + optimizer_slots))
    return (shape.base_params * float(weight_bytes) + acts + state).astype(np.float32)


def payload_bytes(ranks, shape: ModelShape, *, parts: Sequence[str] = ("a", "b"),
                  bytes_per_param: int = 4, include_head: bool = True):
    """Bytes of the active parameters that travel: ``(lora params + head) * bytes_per_param``."""
    n = lora_params(ranks, shape, parts=parts) + (shape.head_params if include_head else 0)
    return (n * float(bytes_per_param)).astype(np.float32)


def bytes_up(ranks, shape: ModelShape, *, parts: Sequence[str] = ("a", "b"),
             bytes_per_param: int = 4, include_head: bool = True):
    """Uplink bytes ``[...]`` (use the aggregator's ``uplink_parts``)."""
    return payload_bytes(ranks, shape, parts=parts, bytes_per_param=bytes_per_param,
                         include_head=include_head)


def bytes_down(ranks, shape: ModelShape, *, parts: Sequence[str] = ("a", "b"),
               bytes_per_param: int = 4, include_head: bool = True):
    """Downlink bytes ``[...]`` (use the aggregator's ``downlink_parts``)."""
    return payload_bytes(ranks, shape, parts=parts, bytes_per_param=bytes_per_param,
                         include_head=include_head)


class ClientTime(NamedTuple):
    """Simulated seconds: ``compute_s``, ``comm_s`` and their sum ``total_s`` (each ``[...]``)."""

    compute_s: Array
    comm_s: Array
    total_s: Array


def client_time(flops, up_bytes, down_bytes, device: DeviceProfile | DeviceArrays) -> ClientTime:
    """``compute = flops / (peak * efficiency)``; ``comm = 8 up / uplink + 8 down / downlink``.

    ``device`` is a :class:`DeviceProfile` (scalars) or :class:`DeviceArrays` (``[C]``).
    """
    compute = flops / (device.peak_flops * device.efficiency)
    comm = 8.0 * up_bytes / device.uplink_bps + 8.0 * down_bytes / device.downlink_bps
    return ClientTime(compute, comm, compute + comm)


def client_energy(time: ClientTime, device: DeviceProfile | DeviceArrays, *, idle_s=0.0):
    """Energy in joules: ``power * compute_s + radio_watts * comm_s + idle_watts * idle_s``.

    ASSUMPTION: the board draws ``power_watts`` while computing and ``radio_watts`` while
    communicating (no overlap); waiting (``idle_s``, e.g. round time minus own time) costs
    ``idle_watts`` (0 when the profile has none).
    """
    idle_w = getattr(device, "idle_watts", None)
    idle_w = 0.0 if idle_w is None else idle_w
    return (device.power_watts * time.compute_s + device.radio_watts * time.comm_s
            + idle_w * idle_s)


def round_time(times, deadline=None, *, valid=None):
    """Synchronous round time and the clients that made it.

    Args:
      times: ``[C]`` client times (s).
      deadline: ``None`` or a scalar (s); clients slower than it are dropped.
      valid: optional ``[C]`` bool participation mask (padding clients = False).

    Returns:
      ``(round_s, kept [C] bool)``. Without a deadline: the slowest valid client. With one:
      the slowest kept client, or the deadline itself if any valid client was dropped (the
      server waits until the deadline before giving up on it).
    """
    xp = _xp(times, deadline, valid)
    t = xp.asarray(times)
    v = xp.ones(t.shape, bool) if valid is None else xp.asarray(valid).astype(bool)
    kept = v if deadline is None else v & (t <= deadline)
    slowest = xp.max(xp.where(kept, t, 0.0), axis=-1)
    if deadline is None:
        return slowest, kept
    dropped = xp.any(v & ~kept, axis=-1)
    return xp.where(dropped, xp.asarray(deadline, t.dtype), slowest), kept


class ClientCost(NamedTuple):
    """Everything the cost model says about one (or ``[C]``) client round."""

    flops: Array
    memory_bytes: Array
    fits_memory: Array
    bytes_up: Array
    bytes_down: Array
    compute_s: Array
    comm_s: Array
    time_s: Array
    energy_j: Array


def client_cost(ranks, cut, shape: ModelShape, device: DeviceProfile | DeviceArrays, *,
                batch: int, steps: int, uplink_parts: Sequence[str] = ("a", "b"),
                downlink_parts: Sequence[str] = ("a", "b"), bytes_per_param: int = 4,
                include_head: bool = True, memory_kwargs: Mapping | None = None) -> ClientCost:
    """All of :func:`client_flops`, :func:`client_memory`, bytes, time and energy at once."""
    fl = client_flops(ranks, cut, shape, batch=batch, steps=steps)
    mem = client_memory(ranks, cut, shape, batch=batch, **dict(memory_kwargs or {}))
    up = bytes_up(ranks, shape, parts=uplink_parts, bytes_per_param=bytes_per_param,
                  include_head=include_head)
    dn = bytes_down(ranks, shape, parts=downlink_parts, bytes_per_param=bytes_per_param,
                    include_head=include_head)
    t = client_time(fl, up, dn, device)
    return ClientCost(fl, mem, mem <= device.memory_bytes, up, dn, t.compute_s, t.comm_s,
                      t.total_s, client_energy(t, device))
