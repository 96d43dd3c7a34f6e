"""FedIT (Zhang et al., arXiv 2305.05644): FedAvg of the LoRA factors.

Every client trains the prefix of its rank; heterogeneous ranks are zero-padded with data
weights and no per-slot renormalisation (the "naive zero padding" control of Byun & Lee).
"""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """FedIT (Zhang et al., arXiv 2305.05644): every client trains the prefix of its rank, the
    server averages the factors (zero padding, data weights).

    Options: none of its own; ``fedlora_jax.aggregation.fedit`` takes no aggregator options.
    """
    return static_rank("fedit", agg_lib.fedit(**ctx.aggregator_options), ctx)
