"""One table of method names: the algorithm's, its aggregator's, and the other names users give.

An algorithm (``fedlora_jax.algorithms.BUILDERS``) is named after its paper (``hetlora``,
``hafl``, ``fedex``); its aggregator (``fedlora_jax.aggregation.AGGREGATORS``) after the
server rule it runs (``zero_padding``, ``rank1_adaptive``, ``fedex_lora``). Each row of
:data:`METHODS` ties the two, so either name works in both places:
``canonical_name("zero_padding") == "hetlora"`` and ``get_aggregator("hetlora").name ==
"zero_padding"``. Both registries derive their alias dicts from this table and nothing else
(``tests/test_names.py`` checks that every row's algorithm builds that aggregator).

Algorithms without a row run an aggregator of another name on purpose (``adalora``,
``legend``, ``head_only``); aggregators without a row have no algorithm of their own
(``mixed_padding``: use it through ``aggregator`` options).
"""

from __future__ import annotations

from typing import NamedTuple


class MethodName(NamedTuple):
    """One method's names: ``algorithm`` (registry name), ``aggregator`` (its server rule's
    registry name) and ``aliases`` (other spellings, accepted by both registries)."""

    algorithm: str
    aggregator: str
    aliases: tuple[str, ...] = ()


METHODS: tuple[MethodName, ...] = (
    MethodName("fedit", "fedit", ("fedavg",)),
    MethodName("hetlora", "zero_padding"),
    MethodName("replication", "replication_padding", ("rep",)),
    MethodName("flexlora", "flexlora", ("flex_lora",)),
    MethodName("flora", "flora"),
    MethodName("fedex", "fedex_lora"),
    MethodName("ffa", "ffa_lora"),
    MethodName("fedsa", "fedsa_lora"),
    MethodName("hafl", "rank1_adaptive"),
    MethodName("fedara", "fedara"),
)


def normalize(name: str) -> str:
    """The lookup key of a user-given name: stripped, lower case, ``-`` as ``_``."""
    return name.strip().lower().replace("-", "_")


def _aliases(field: str) -> dict[str, str]:
    out = {}
    for row in METHODS:
        target = getattr(row, field)
        for other in (row.algorithm, row.aggregator, *row.aliases):
            if other != target:
                out[other] = target
    return out


#: Other name -> algorithm registry name (aggregator names and aliases).
ALGORITHM_ALIASES: dict[str, str] = _aliases("algorithm")
#: Other name -> aggregator registry name (algorithm names and aliases).
AGGREGATOR_ALIASES: dict[str, str] = _aliases("aggregator")
