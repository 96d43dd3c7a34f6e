"""HetLoRA (Cho et al., arXiv 2401.06432): zero padding with sparsity (product-norm) weights.

``aggregator_options={"weighting": "data"}`` gives plain data-weighted zero padding (= FedIT).
"""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    return static_rank("hetlora", agg_lib.zero_padding(**ctx.aggregator_options), ctx)
