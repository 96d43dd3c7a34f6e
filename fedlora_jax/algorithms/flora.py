"""FLoRA (Wang et al., arXiv 2409.05976): the clients' adapters are stacked, the stacked product
is folded into the frozen base and the adapters restart."""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """FLoRA (Wang et al., arXiv 2409.05976): fixed-rank prefixes; the server stacks the clients'
    adapters, folds the stacked product into the frozen base and the adapters restart.

    Options: none of its own. Aggregator option (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.flora``): ``downlink`` (``"stack"`` | ``"dense"``); its ``scale``
    is the run's LoRA scale and is refused as an option.
    """
    if "scale" in ctx.aggregator_options:
        raise ValueError("aggregator option scale is set by the algorithm (the run's LoRA scale lora_alpha / "
                         "r_max); change lora_alpha instead")
    return static_rank("flora", agg_lib.flora(scale=ctx.scale, **ctx.aggregator_options), ctx)
