"""The algorithm registry: one line per method (``name: module.build``).

``build_algorithm(name, ctx, **options)`` checks ``options`` against the factory's keyword-only
parameters (its signature is the schema) and builds the :class:`~fedlora_jax.algorithms.Algorithm`.
Other names for a method (its aggregator's name, ``fedavg``, ``rep``, ...) come from the one table
:data:`fedlora_jax.names.METHODS`, which ``get_aggregator`` reads too.

=============  =====================================================================
name           method
=============  =====================================================================
fedit          FedAvg of factors (FedIT, arXiv 2305.05644); heterogeneous ranks are
               zero-padded with data weights (alias ``fedavg``)
hetlora        zero padding + sparsity-weighted aggregation (HetLoRA, arXiv 2401.06432)
replication    replication padding, REP-MEAN (Byun & Lee, arXiv 2406.17477)
flexlora       weighted product sum + SVD redistribution (arXiv 2402.11505)
flora          stacking folded into the base (arXiv 2409.05976)
fedex          FedAvg + residual folded into the base (arXiv 2410.09432)
ffa            A frozen and shared, B trained (arXiv 2403.12313)
fedsa          only A shared and averaged, B stays local (arXiv 2410.01463)
hafl           importance-based rank-1 freezing (default) or truncation + rank-1 adaptive
               aggregation (HAFL, arXiv 2411.06581)
fedara         SVD-form adapter, cubic budget, global nested masks, module pruning
               (FedARA, arXiv 2501.14406)
adalora        PEFT's AdaLoRA run federatedly (unmasked forward, lambda zeroed in place,
               non-nested allocation, full-rank traffic): FedARA's baseline
legend         per-device LoRA depth and rank ramp from the LCD configurator, re-planned
               from measured device times (LEGEND, arXiv 2412.20004)
head_only      control: no adapter trained or sent, only the classifier head is federated
=============  =====================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from fedlora_jax.algorithms import (
    adalora,
    fedara,
    fedex,
    fedit,
    fedsa,
    ffa,
    flexlora,
    flora,
    hafl,
    head_only,
    hetlora,
    legend,
    replication,
)
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, build_options
from fedlora_jax.names import ALGORITHM_ALIASES, normalize

BUILDERS: dict[str, Callable[..., Algorithm]] = {
    "fedit": fedit.build,
    "hetlora": hetlora.build,
    "replication": replication.build,
    "flexlora": flexlora.build,
    "flora": flora.build,
    "fedex": fedex.build,
    "ffa": ffa.build,
    "fedsa": fedsa.build,
    "hafl": hafl.build,
    "fedara": fedara.build,
    "adalora": adalora.build,
    "legend": legend.build,
    "head_only": head_only.build,
}

#: Other name -> algorithm name: aggregator names and aliases, from the one table of method names
#: (:data:`fedlora_jax.names.METHODS`).
ALIASES: dict[str, str] = ALGORITHM_ALIASES

NAMES: tuple[str, ...] = tuple(BUILDERS)


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (aliases resolved); ``ValueError`` with a suggestion if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"algorithm name must be a str, got {type(name).__name__}")
    key = normalize(name)
    key = ALIASES.get(key, key)
    if key not in BUILDERS:
        close = _closest(key)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}; known: {sorted(BUILDERS)}, aliases: {sorted(ALIASES)}")
    return key


def _closest(key: str) -> str | None:
    """The registered name or alias closest to ``key`` (aliases count: ``fedavgg`` -> ``fedavg``)."""
    close = difflib.get_close_matches(key, list(BUILDERS) + list(ALIASES), n=1, cutoff=0.6)
    return close[0] if close else None


def build_algorithm(name: str, ctx: AlgoContext, **options) -> Algorithm:
    """Build the algorithm called ``name`` with keyword ``options`` (see the table above)."""
    key = canonical_name(name)
    build = BUILDERS[key]
    return build(ctx, **build_options(build, options, key))
