"""FlexLoRA (Bai et al., arXiv 2402.11505): weighted sum of the clients' products, re-factored by
truncated SVD for each client's rank."""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """FlexLoRA (Bai et al., arXiv 2402.11505): fixed-rank prefixes; the server sums the
    clients' weighted products and re-factors them by truncated SVD, each client receiving its
    rank's prefix.

    Options: none of its own. Aggregator options (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.flexlora``): ``split`` (``"b"`` | ``"a"`` | ``"sqrt"``: where the
    singular values go), ``method`` (``"auto"`` | ``"lowrank"`` | ``"dense"`` SVD),
    ``gradient_safe``.
    """
    return static_rank("flexlora", agg_lib.flexlora(**ctx.aggregator_options), ctx)
