"""What travels between a server and one client, as flat ``{name: numpy array}`` dicts.

Only the active slots of an adapter are serialized, as the communication counts of
:func:`fedlora_jax.aggregation.comm_params` assume: for module ``k`` with mask ``m [R]``
(``r = sum(m)`` active slots) the payload holds ``a[:, m] [N, r]``, ``b[m, :] [r, M]``,
``e[m] [r]`` (only the factors asked for) and the mask itself (``uint8 [R]``). The receiver
re-pads onto a *fill* tree (the values it already knows: the start it distributed, its own
last adapter), so slots and factors that were not sent keep those values.

Numpy only (no Flower, no pickle): the Flower app wraps these dicts in ``ArrayRecord``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

FACTORS = ("a", "b", "e")


def factor_parts(parts: Sequence[str], tree: LoraTree) -> tuple[str, ...]:
    """The factor tokens (``a``, ``b``, ``e``) of ``parts`` that ``tree`` has."""
    has_e = next(iter(tree.values())).e is not None
    return tuple(p for p in FACTORS if p in parts and (p != "e" or has_e))


def _check_mask(key: str, mask: np.ndarray, r: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != (r,):
        raise ValueError(f"module {key!r}: only [R] masks can be packed (modules without leading axes), "
                         f"got mask shape {m.shape} for R={r}")
    return m != 0


def pack_lora(tree: LoraTree, masks: MaskTree, parts: Sequence[str], *, prefix: str) -> dict[str, np.ndarray]:
    """The active slots of ``parts`` of ``tree`` and the masks, as ``{f"{prefix}/{key}/{part}": array}``.

    Args:
      tree: one client's adapter (no client axis): ``a [N, R]``, ``b [R, M]``, ``e [R] | None``.
      masks: ``{key: [R]}`` in {0, 1}; the slots to send.
      parts: factors to send (tokens other than ``a``, ``b``, ``e`` are ignored).
      prefix: name prefix (``"down"``, ``"up"``).
    """
    out = {}
    for k, f in tree.items():
        m = _check_mask(k, masks[k], f.a.shape[-1])
        out[f"{prefix}/{k}/mask"] = m.astype(np.uint8)
        for p in factor_parts(parts, tree):
            x = np.asarray(getattr(f, p))
            out[f"{prefix}/{k}/{p}"] = np.ascontiguousarray(x[:, m] if p == "a" else x[m])
    return out


def unpack_lora(arrays: Mapping[str, np.ndarray], fill: LoraTree, *, prefix: str) -> tuple[LoraTree, MaskTree]:
    """Re-pad a :func:`pack_lora` payload onto ``fill`` (a tree of the full shapes).

    Returns:
      ``(tree, masks)``: ``fill`` with the sent slots of the sent factors overwritten, and the
      sent masks (float32 ``[R]``).
    """
    tree, masks = {}, {}
    for k, f in fill.items():
        m = np.asarray(arrays[f"{prefix}/{k}/mask"]) != 0
        masks[k] = m.astype(np.float32)
        new = {}
        for p in FACTORS:
            old = getattr(f, p)
            name = f"{prefix}/{k}/{p}"
            if old is None or name not in arrays:
                new[p] = None if old is None else np.asarray(old)
                continue
            x = np.array(old, copy=True)
            if p == "a":
                x[:, m] = arrays[name]
            else:
                x[m] = arrays[name]
            new[p] = x
        tree[k] = LoraFactors(**new)
    return tree, masks


def pack_slots(values: Mapping[str, np.ndarray], masks: MaskTree, *, prefix: str) -> dict[str, np.ndarray]:
    """Per-slot values ``{key: [R]}`` (importance scores) over the active slots of ``masks``."""
    return {f"{prefix}/{k}": np.ascontiguousarray(np.asarray(v)[np.asarray(masks[k]) != 0]) for k, v in values.items()}


def unpack_slots(arrays: Mapping[str, np.ndarray], masks: MaskTree, *, prefix: str, dtype=np.float32) -> dict:
    """Inverse of :func:`pack_slots`: zeros where the mask is 0."""
    out = {}
    for k, m in masks.items():
        m = np.asarray(m) != 0
        x = np.zeros(m.shape, dtype)
        x[m] = arrays[f"{prefix}/{k}"]
        out[k] = x
    return out


def pack_tree(tree: Any, *, prefix: str) -> dict[str, np.ndarray]:
    """Every leaf of a pytree (the head, a dense base delta) as ``{f"{prefix}/{i}": array}``."""
    return {f"{prefix}/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def unpack_tree(arrays: Mapping[str, np.ndarray], like: Any, *, prefix: str) -> Any:
    """Inverse of :func:`pack_tree` for a pytree shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    return jax.tree.unflatten(treedef, [np.asarray(arrays[f"{prefix}/{i}"]) for i in range(len(leaves))])


def payload_bytes(arrays: Mapping[str, np.ndarray], *, skip_masks: bool = True) -> int:
    """Bytes of the numbers of a payload (masks, names ending in ``mask``, one byte a slot,
    excluded by default: the communication counts leave them out)."""
    return int(sum(np.asarray(v).nbytes for k, v in arrays.items() if not (skip_masks and k.endswith("mask"))))


# ----------------------------------------------------------------------------- checking a reply


def layout(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of a payload: what :func:`check_payload` compares a received
    payload with (build it from the payload the receiver expects, e.g. :func:`pack_lora` of
    the start it sent over the update masks it assigned)."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in arrays.items()}


def check_payload(arrays: Mapping[str, Any], expected: Mapping[str, np.ndarray]) -> str | None:
    """Why a received payload must not be used, or ``None`` when it is exactly as expected.

    ``expected`` is a payload of the expected layout whose mask entries (names ending in
    ``mask``) are the masks the receiver assigned. In order, the payload is refused when it is
    larger than expected (before anything else is read), holds other names, a mask with slots
    it was not given (or without slots it was given), a value of another shape or dtype, or a
    non-finite number.

    Returns:
      a one-line reason naming the entry, or ``None``.
    """
    want_bytes = int(sum(np.asarray(v).nbytes for v in expected.values()))
    got_bytes = 0
    for v in arrays.values():
        got_bytes += int(getattr(v, "nbytes", 0)) if isinstance(v, np.ndarray) else 0
        if not isinstance(v, np.ndarray):
            return f"an entry is a {type(v).__name__}, not an array"
    if got_bytes > want_bytes:
        return f"oversized payload: {got_bytes} bytes, expected {want_bytes}"
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong keys: missing {missing[:4]}, unexpected {extra[:4]}"
    for k, want in expected.items():
        got, want = arrays[k], np.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{k}: shape {got.shape} dtype {got.dtype}, expected shape {want.shape} dtype {want.dtype}"
        if k.endswith("mask") and not np.array_equal(got != 0, want != 0):
            extra_slots = np.flatnonzero((got != 0) & (want == 0)).tolist()
            if extra_slots:
                return f"{k}: slots {extra_slots} it was not given"
            return f"{k}: without slots {np.flatnonzero((got == 0) & (want != 0)).tolist()} it was given"
        if np.issubdtype(got.dtype, np.inexact) and not np.all(np.isfinite(got)):
            return f"{k}: non-finite values"
    return None
