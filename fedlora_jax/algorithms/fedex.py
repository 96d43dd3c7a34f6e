"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): FedAvg of the factors plus the exact residual
(mean of products minus product of means) folded into the frozen base."""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """FedEx-LoRA (Singhal et al., arXiv 2410.09432): fixed-rank prefixes; FedAvg of the
    factors, and the exact residual (mean of products minus product of means) folded into the
    frozen base.

    Options: none of its own. Aggregator options (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.fedex_lora``): ``averaging`` (``"zero_pad"`` | ``"renorm"``),
    ``residual_downlink`` (``"dense"`` | ``"factored"``); its ``scale`` is the run's LoRA scale
    and is refused as an option.
    """
    if "scale" in ctx.aggregator_options:
        raise ValueError("aggregator option scale is set by the algorithm (the run's LoRA scale lora_alpha / "
                         "r_max); change lora_alpha instead")
    return static_rank("fedex", agg_lib.fedex_lora(scale=ctx.scale, **ctx.aggregator_options), ctx)
