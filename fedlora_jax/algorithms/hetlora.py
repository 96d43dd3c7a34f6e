"""HetLoRA (Cho et al., arXiv 2401.06432): zero padding with sparsity (product-norm) weights.

``aggregator_options={"weighting": "data"}`` gives plain data-weighted zero padding (= FedIT).
"""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """HetLoRA (Cho et al., arXiv 2401.06432): fixed-rank prefixes, zero-padded aggregation
    weighted by each client's product norm.

    Options: none of its own. Aggregator options (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.zero_padding``): ``weighting`` (``"sparsity"`` | ``"data"``),
    ``data_weighted`` (multiply the sparsity weights by the data weights).
    """
    return static_rank("hetlora", agg_lib.zero_padding(**ctx.aggregator_options), ctx)
