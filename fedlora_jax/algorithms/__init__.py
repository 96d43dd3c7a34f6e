"""Federated LoRA methods, one file each, on one interface (:mod:`~fedlora_jax.algorithms.base`).

- :mod:`~fedlora_jax.algorithms.base`: :class:`Algorithm`, :class:`ClientPlan`,
  :class:`ClientOptions`, :class:`ClientStateRule`, :class:`RoundOutputs`,
  :class:`RoundReport`, :class:`AlgoContext`.
- :mod:`~fedlora_jax.algorithms.registry`: ``build_algorithm(name, ctx, **options)`` and the
  table of methods (``fedit.py``, ``hetlora.py``, ``replication.py``, ``flexlora.py``,
  ``flora.py``, ``fedex.py``, ``ffa.py``, ``fedsa.py``, ``hafl.py``, ``fedara.py``,
  ``adalora.py``, ``legend.py``).
- :mod:`~fedlora_jax.algorithms.rank_rules`: FedARA allocation / pruning, HAFL truncation and
  freezing masks, prefix masks, orthogonality regulariser.
- :mod:`~fedlora_jax.algorithms.legend_planner`: LEGEND's capacity estimates and LCD
  configurator (host NumPy); :mod:`~fedlora_jax.algorithms.legend`: the algorithm that runs it.
"""

from fedlora_jax.algorithms import legend, legend_planner, rank_rules
from fedlora_jax.algorithms.base import (
    AlgoContext,
    Algorithm,
    ClientOptions,
    ClientPlan,
    ClientStateRule,
    EmptyAlgoState,
    RoundOutputs,
    RoundReport,
)
from fedlora_jax.algorithms.legend_planner import (
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
from fedlora_jax.algorithms.registry import ALIASES, BUILDERS, NAMES, build_algorithm, canonical_name

__all__ = [
    "ALIASES",
    "BUILDERS",
    "NAMES",
    "AlgoContext",
    "Algorithm",
    "CapacityEstimate",
    "ClientOptions",
    "ClientPlan",
    "ClientStateRule",
    "EmptyAlgoState",
    "HaflMasks",
    "LcdPlan",
    "LoraConfig",
    "Measurement",
    "RoundOutputs",
    "RoundReport",
    "active_modules",
    "build_algorithm",
    "canonical_name",
    "depth_mask",
    "fedara_allocate",
    "hafl_truncation_masks",
    "hafl_update_masks",
    "lcd_plan",
    "legend",
    "legend_planner",
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
