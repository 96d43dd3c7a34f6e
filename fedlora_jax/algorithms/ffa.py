"""FFA-LoRA (Sun et al., arXiv 2403.12313): ``a`` frozen at its random init and shared; only
``b`` is trained and averaged."""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientOptions, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """FFA-LoRA (Sun et al., arXiv 2403.12313): fixed-rank prefixes; ``a`` stays frozen at its
    shared random init (``ClientOptions.frozen_parts``), only ``b`` is trained and averaged.

    Options: none of its own; ``fedlora_jax.aggregation.ffa_lora`` takes no aggregator options.
    """
    return static_rank("ffa", agg_lib.ffa_lora(**ctx.aggregator_options), ctx,
                       client=ClientOptions(frozen_parts=("a",)))
