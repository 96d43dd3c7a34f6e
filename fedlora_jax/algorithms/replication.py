"""Replication padding (Byun & Lee, arXiv 2406.17477): a client's missing rank slots are
padded with the owners' values before averaging (REP-MEAN: per-slot mean over the owners).

The paper's setting ties rank to data quality (high-quality clients get the high rank); the
driver does that with ``ExperimentConfig.client_groups`` (a Dirichlet alpha and a rank per
group of clients), see ``experiments/configs/byun_lee.py``.
"""

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, static_rank


def build(ctx: AlgoContext) -> Algorithm:
    return static_rank("replication", agg_lib.replication_padding(**ctx.aggregator_options), ctx)
