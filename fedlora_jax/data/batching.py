"""Static-shape client batches ``[C, S, B, T]`` and padded evaluation batches (NumPy).

One round's batches depend only on ``(seed, round_idx, client_id)`` (through
``np.random.default_rng([seed, round_idx, client_id])``), so a resumed run rebuilds exactly
the batches an uninterrupted run would have used, whatever clients were sampled before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedlora_jax.data.tokenization import TokenizedDataset

POLICIES = ("epoch", "exact")


class ClientBatches(NamedTuple):
    """One round of local batches for ``C`` clients, ``S`` steps of ``B`` examples.

    Attributes:
      input_ids: ``[C, S, B, T]`` int32.
      attention_mask: ``[C, S, B, T]`` int32.
      labels: ``[C, S, B]`` int32 (or ``[C, S, B, T]`` for causal LM).
      example_mask: ``[C, S, B]`` float32, 0 for padding examples (their tokens are copies
        of real examples, so the forward pass stays finite; the loss must weight by the mask).
      num_steps: ``[C]`` int32 valid steps (steps ``>= num_steps[c]`` are all padding).
      num_examples: ``[C]`` int32 local dataset size of each client (aggregation weight).
      example_ids: ``[C, S, B]`` int32 row of each example in the tokenized dataset.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    example_mask: np.ndarray
    num_steps: np.ndarray
    num_examples: np.ndarray
    example_ids: np.ndarray


class EvalBatches(NamedTuple):
    """An evaluation set cut into ``K`` batches of static size ``B``.

    Attributes:
      input_ids: ``[K, B, T]`` int32.
      attention_mask: ``[K, B, T]`` int32.
      labels: ``[K, B]`` int32 (or ``[K, B, T]``).
      example_mask: ``[K, B]`` float32, 0 for the padding rows of the last batch.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    example_mask: np.ndarray


def _check_pos_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def client_rng(seed: int, round_idx: int, client_id: int) -> np.random.Generator:
    """The generator for one client in one round: ``default_rng([seed, round_idx, client_id])``."""
    for name, v in (("seed", seed), ("round_idx", round_idx), ("client_id", client_id)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return np.random.default_rng([int(seed), int(round_idx), int(client_id)])


def client_example_order(
    part: np.ndarray, *, steps: int, batch_size: int, policy: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Example ids ``[S, B]``, example mask ``[S, B]`` and valid steps for one client.

    ``policy="epoch"``: cycle through fresh shuffles of the client's data (with wraparound)
    until ``S * B`` slots are filled; every step is valid. ``policy="exact"``: one shuffled
    pass of at most ``S * B`` examples; ``ceil(n / B)`` (capped at ``S``) valid steps, the
    remaining slots are masked copies (wraparound) of real examples.
    """
    n = int(len(part))
    if n == 0:
        raise ValueError("client has no examples (empty client)")
    total = steps * batch_size
    reps = -(-total // n)
    order = np.concatenate([rng.permutation(part) for _ in range(reps)])[:total]
    mask = np.ones(total, np.float32)
    valid_steps = steps
    if policy == "exact":
        mask[min(n, total) :] = 0.0
        valid_steps = min(-(-n // batch_size), steps)
    return order.reshape(steps, batch_size), mask.reshape(steps, batch_size), valid_steps


def make_client_batches(
    tokenized: TokenizedDataset,
    parts: Sequence[np.ndarray],
    client_ids: Sequence[int] | np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    round_idx: int,
    policy: str = "epoch",
) -> ClientBatches:
    """Build one round's static-shape batches for the sampled clients.

    Args:
      tokenized: the training set, ``E`` examples.
      parts: the partition (a list of index arrays into ``tokenized``), one per client.
      client_ids: ``C`` ids of the clients of this round (indices into ``parts``).
      steps: ``S`` local steps.
      batch_size: ``B``.
      seed: experiment seed (``>= 0``).
      round_idx: round number (``>= 0``).
      policy: ``"epoch"`` (wraparound sampling, all ``S`` steps valid) or ``"exact"`` (one
        pass, ``min(ceil(n_c / B), S)`` valid steps, padded examples masked).

    Returns:
      :class:`ClientBatches` of NumPy arrays, deterministic in
      ``(seed, round_idx, client_id)``.

    Raises:
      ValueError: an unknown policy, an empty client, a client id out of range, bad sizes.
    """
    steps = _check_pos_int("steps", steps)
    batch_size = _check_pos_int("batch_size", batch_size)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    ids = np.asarray(client_ids).reshape(-1)
    if ids.size == 0:
        raise ValueError("client_ids is empty; expected at least one client")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= len(parts):
        raise ValueError(f"client_ids must be ints in [0, {len(parts)}), got {ids.tolist()}")
    num_rows = tokenized.num_examples
    orders, masks, valid, sizes = [], [], [], []
    for cid in ids.tolist():
        part = np.asarray(parts[cid], np.int64)
        if part.size == 0:
            raise ValueError(f"client {cid} has no examples (empty client)")
        if part.min() < 0 or part.max() >= num_rows:
            raise ValueError(f"client {cid} has indices outside [0, {num_rows})")
        order, mask, num_valid = client_example_order(
            part,
            steps=steps,
            batch_size=batch_size,
            policy=policy,
            rng=client_rng(seed, round_idx, cid),
        )
        orders.append(order)
        masks.append(mask)
        valid.append(num_valid)
        sizes.append(part.size)
    example_ids = np.stack(orders)  # [C, S, B]
    return ClientBatches(
        input_ids=tokenized.input_ids[example_ids],
        attention_mask=tokenized.attention_mask[example_ids],
        labels=tokenized.labels[example_ids],
        example_mask=np.stack(masks),
        num_steps=np.asarray(valid, np.int32),
        num_examples=np.asarray(sizes, np.int32),
        example_ids=example_ids.astype(np.int32),
    )


def eval_batches(
    tokenized: TokenizedDataset, batch_size: int, *, max_examples: int | None = None
) -> EvalBatches:
    """Cut the (first ``max_examples``) examples into ``K = ceil(E / B)`` static batches.

    The last batch is filled with copies of example 0, masked out in ``example_mask``.
    """
    batch_size = _check_pos_int("batch_size", batch_size)
    num = tokenized.num_examples if max_examples is None else min(
        _check_pos_int("max_examples", max_examples), tokenized.num_examples
    )
    if num == 0:
        raise ValueError("tokenized has no examples to evaluate")
    k = -(-num // batch_size)
    rows = np.zeros(k * batch_size, np.int64)
    rows[:num] = np.arange(num)
    mask = np.zeros(k * batch_size, np.float32)
    mask[:num] = 1.0
    rows = rows.reshape(k, batch_size)
    return EvalBatches(
        input_ids=tokenized.input_ids[rows],
        attention_mask=tokenized.attention_mask[rows],
        labels=tokenized.labels[rows],
        example_mask=mask.reshape(k, batch_size),
    )
