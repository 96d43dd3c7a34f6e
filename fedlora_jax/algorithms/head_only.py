"""Head-only control: no adapter is trained or sent; only the classifier head is federated.

Every comparison of the reproductions runs this arm (issue 23) so that the adapters' own
contribution is visible: whatever a LoRA method gains over it comes from the adapters. Every
client's forward and update masks are zero, so the adapters stay at their zero init (``B = 0``),
no factor travels (the uplink is the head alone) and, through ``global_masks``, every module
skips its low-rank matmul. With no active layer the lowest layer needing a gradient is ``L``, and
``static_cut`` (default) compiles the round with that cut, so no backward pass runs through the
encoder at all (the head's gradient needs none): the control costs a forward pass per step.
"""

import numpy as np

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientPlan


def build(ctx: AlgoContext, *, static_cut: bool = True) -> Algorithm:
    """The head-only control (no paper: issue 23's floor for every comparison): no adapter slot
    is trained or sent, only the classifier head is averaged (FedIT's aggregator).

    Args:
      ctx: the algorithm context.
      static_cut: ``True`` (default) compiles the round without a backward pass through the
        encoder; ``False`` keeps the (all-zero) one, the same numbers at the cost of a LoRA arm.
    """
    if not isinstance(static_cut, bool):
        raise TypeError(f"head_only: static_cut must be a bool, got {static_cut!r}")

    def plan(state, client_ids, round_idx):
        del state, round_idx
        zeros = np.zeros((len(client_ids), ctx.r_max), np.float32)
        masks = {k: zeros for k in ctx.keys}
        return ClientPlan(masks, masks, global_masks={k: zeros[0] for k in ctx.keys})

    return Algorithm(name="head_only", aggregator=agg_lib.fedit(**ctx.aggregator_options), plan=plan,
                     eval_masks=lambda algo_state: {k: np.zeros(ctx.r_max, np.float32) for k in ctx.keys},
                     static_cut=static_cut, options={"static_cut": static_cut})
