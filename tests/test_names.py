"""The one table of method names (``fedlora_jax.names``): every row's algorithm builds that
aggregator, either name resolves in both registries, and the registries take their aliases from
the table alone."""

from __future__ import annotations

import pytest
from helpers import algo_rounds as ar

from fedlora_jax import aggregation as agg_lib
from fedlora_jax import algorithms as algo_lib
from fedlora_jax.names import AGGREGATOR_ALIASES, ALGORITHM_ALIASES, METHODS

ROWS = {row.algorithm: row for row in METHODS}


@pytest.mark.parametrize("row", METHODS, ids=[row.algorithm for row in METHODS])
def test_row_algorithm_builds_its_aggregator(row):
    assert row.algorithm in algo_lib.BUILDERS and row.aggregator in agg_lib.AGGREGATORS
    assert algo_lib.build_algorithm(row.algorithm, ar.context()).aggregator.name == row.aggregator


@pytest.mark.parametrize("row", METHODS, ids=[row.algorithm for row in METHODS])
def test_every_name_of_a_row_resolves_in_both_registries(row):
    for name in (row.algorithm, row.aggregator, *row.aliases):
        spelled = name.upper().replace("_", "-")
        assert algo_lib.canonical_name(spelled) == row.algorithm
        assert agg_lib.get_aggregator(spelled, **_required(row.aggregator)).name == row.aggregator


def test_an_algorithm_without_a_row_is_no_aggregator_name():
    """``adalora``, ``legend``, ``head_only`` run another method's aggregator: their names must not
    resolve to some other aggregator (that would be a disagreement the table does not record)."""
    for name in set(algo_lib.BUILDERS) - set(ROWS):
        assert name not in agg_lib.AGGREGATORS and name not in AGGREGATOR_ALIASES
        assert algo_lib.build_algorithm(name, ar.context()).aggregator.name in agg_lib.AGGREGATORS


def test_registries_take_their_aliases_from_the_table():
    assert algo_lib.ALIASES is ALGORITHM_ALIASES and agg_lib.ALIASES is AGGREGATOR_ALIASES
    assert not set(ALGORITHM_ALIASES) & set(algo_lib.BUILDERS)  # an alias never shadows a name
    assert not set(AGGREGATOR_ALIASES) & set(agg_lib.AGGREGATORS)
    assert set(ALGORITHM_ALIASES.values()) <= set(algo_lib.BUILDERS)
    assert set(AGGREGATOR_ALIASES.values()) <= set(agg_lib.AGGREGATORS)
    assert ALGORITHM_ALIASES["zero_padding"] == "hetlora" and AGGREGATOR_ALIASES["hafl"] == "rank1_adaptive"
    assert ALGORITHM_ALIASES["fedex_lora"] == "fedex" and AGGREGATOR_ALIASES["fedavg"] == "fedit"


def _required(aggregator: str) -> dict:
    """Options an aggregator cannot be built without (the base-folding ones need the LoRA scale)."""
    return {"scale": 0.5} if aggregator in ("flora", "fedex_lora") else {}
