"""The seed algorithms as compositions of the library's pure pieces.

- :mod:`~fedlora_jax.algorithms.compose`: ``build_algorithm(name, ctx)`` -> :class:`Algorithm`
  (FedIT, HetLoRA, replication padding, FlexLoRA, FLoRA, FedEx-LoRA, FFA-LoRA, HAFL, FedARA, LEGEND).
- :mod:`~fedlora_jax.algorithms.rank_rules`: FedARA allocation / pruning, HAFL truncation and
  freezing masks, prefix masks, orthogonality regulariser.
- :mod:`~fedlora_jax.algorithms.legend`: LEGEND's capacity estimates and LCD configurator.
"""

from fedlora_jax.algorithms import legend, rank_rules
from fedlora_jax.algorithms.compose import (
    BUILDERS,
    AlgoContext,
    Algorithm,
    Plan,
    build_algorithm,
)
from fedlora_jax.algorithms.legend import (
    CapacityEstimate,
    LcdPlan,
    LoraConfig,
    Measurement,
    depth_mask,
    lcd_plan,
    rank_ramp,
    replan,
    update_estimate,
)
from fedlora_jax.algorithms.rank_rules import (
    HaflMasks,
    active_modules,
    fedara_allocate,
    hafl_truncation_masks,
    hafl_update_masks,
    lowest_active_layer,
    orth_regularizer,
    prefix_masks,
    prune_modules,
    svd_adapter_init,
)

__all__ = [
    "BUILDERS",
    "AlgoContext",
    "Algorithm",
    "CapacityEstimate",
    "HaflMasks",
    "LcdPlan",
    "LoraConfig",
    "Measurement",
    "Plan",
    "active_modules",
    "build_algorithm",
    "depth_mask",
    "fedara_allocate",
    "hafl_truncation_masks",
    "hafl_update_masks",
    "lcd_plan",
    "legend",
    "lowest_active_layer",
    "orth_regularizer",
    "prefix_masks",
    "prune_modules",
    "rank_rules",
    "rank_ramp",
    "replan",
    "svd_adapter_init",
    "update_estimate",
]
