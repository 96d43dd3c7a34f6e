"""AdaLoRA importance: sensitivity, EMA smoothing and uncertainty, triplet scores, cubic
budget schedule, global and per-client top-k masks. Pure and jittable.

See :mod:`fedlora_jax.importance.scores` and :mod:`fedlora_jax.importance.budget`.
"""

from fedlora_jax.importance.budget import (
    BudgetSchedule,
    budget_schedule,
    per_client_topk,
    topk_masks,
)
from fedlora_jax.importance.scores import (
    EmaState,
    element_scores,
    ema_init,
    ema_update,
    sensitivity,
    triplet_score,
    triplet_scores,
)

__all__ = [
    "BudgetSchedule",
    "EmaState",
    "budget_schedule",
    "element_scores",
    "ema_init",
    "ema_update",
    "per_client_topk",
    "sensitivity",
    "topk_masks",
    "triplet_score",
    "triplet_scores",
]
