"""Server aggregation: the ``Aggregator`` contract and every method (see docs/architecture.md).

Factories (optax style; each returns an :class:`Aggregator` of pure functions):
``fedit``, ``zero_padding`` (= ``hetlora``), ``replication_padding``, ``rank1_adaptive``
(HAFL), ``flexlora``, ``flora``, ``fedex_lora``, ``ffa_lora``, ``fedsa_lora``, ``fedara``, ``mixed_padding``
(zero <-> replication padding, with learnable per-slot hyperparameters).
By name: ``get_aggregator("flexlora", split="sqrt")``; all names in ``AGGREGATORS``.
"""

from fedlora_jax.aggregation.base import (
    AGGREGATORS,
    ALIASES,
    PART_TOKENS,
    Aggregator,
    BaseDeltaState,
    EmptyState,
    ScoreState,
    comm_bytes,
    comm_params,
    comm_summary,
    get_aggregator,
    register,
    round_bytes,
)
from fedlora_jax.aggregation.frozen import fedsa_lora, ffa_lora
from fedlora_jax.aggregation.mixed import PaddingHyper, mixed_padding
from fedlora_jax.aggregation.padding import (
    fedara,
    fedit,
    hetlora,
    hetlora_prune_masks,
    hetlora_prune_regularizer,
    hetlora_tail_norm,
    product_fro_norm,
    rank1_adaptive,
    replication_padding,
    zero_padding,
)
from fedlora_jax.aggregation.product import fedex_lora, flexlora, flora

__all__ = [
    "AGGREGATORS",
    "ALIASES",
    "PART_TOKENS",
    "Aggregator",
    "PaddingHyper",
    "BaseDeltaState",
    "EmptyState",
    "ScoreState",
    "comm_bytes",
    "comm_params",
    "comm_summary",
    "fedara",
    "fedex_lora",
    "fedit",
    "fedsa_lora",
    "ffa_lora",
    "flexlora",
    "flora",
    "get_aggregator",
    "hetlora",
    "hetlora_prune_masks",
    "hetlora_prune_regularizer",
    "hetlora_tail_norm",
    "mixed_padding",
    "product_fro_norm",
    "rank1_adaptive",
    "register",
    "replication_padding",
    "round_bytes",
    "zero_padding",
]
