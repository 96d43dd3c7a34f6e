"""FlexLoRA (Bai et al., arXiv 2402.11505): weighted sum of the clients' products, re-factored by
truncated SVD for each client's rank."""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    return static_rank("flexlora", agg_lib.flexlora(**ctx.aggregator_options), ctx)
