"""Replication padding (Byun & Lee, arXiv 2406.17477): a client's missing rank slots are
padded with the owners' values before averaging (REP-MEAN: per-slot mean over the owners).

The paper's setting ties rank to data quality (high-quality clients get the high rank); the
driver does that with ``ExperimentConfig.client_groups`` (a Dirichlet alpha and a rank per
group of clients), see ``experiments/configs/byun_lee.py``.
"""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    """Replication padding (Byun & Lee, arXiv 2406.17477): fixed-rank prefixes; a client's
    missing slots are padded from the clients that own them before averaging.

    Options: none of its own. Aggregator option (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.replication_padding``): ``variant`` (``"mean"`` REP-MEAN |
    ``"copy"`` REP-COPY).
    """
    return static_rank("replication", agg_lib.replication_padding(**ctx.aggregator_options), ctx)
