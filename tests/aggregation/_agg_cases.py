"""Random aggregation cases and the list of aggregator configurations under test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as ag
from fedlora_jax import testing as kit

SCALE = 0.5
# module -> (leading dims, N, M). One module has a leading layer axis L=2.
MODULES = {"layer.0.query": ((), 9, 7), "stack.ffn": ((2,), 5, 8)}
R = 4
RANKS = (2, 4, 3, 4)

# (id, registry name, hparams, uses e)
CONFIGS = [
    ("fedit", "fedit", {}, False),
    ("hetlora", "zero_padding", {}, False),
    ("hetlora_data_weighted", "zero_padding", {"data_weighted": True}, False),
    ("zero_padding_data", "zero_padding", {"weighting": "data"}, False),
    ("rep_mean", "replication_padding", {}, False),
    ("rep_copy", "replication_padding", {"variant": "copy"}, False),
    ("hafl", "rank1_adaptive", {}, False),
    ("hafl_importance", "rank1_adaptive", {"importance_weighted": True, "score_beta": 0.5}, False),
    ("flexlora", "flexlora", {}, False),
    ("flexlora_sqrt_e", "flexlora", {"split": "sqrt"}, True),
    ("flora", "flora", {"scale": SCALE}, False),
    ("fedex", "fedex_lora", {"scale": SCALE}, False),
    ("fedex_renorm", "fedex_lora", {"scale": SCALE, "averaging": "renorm"}, False),
    ("ffa", "ffa_lora", {}, False),
    ("fedsa", "fedsa_lora", {}, False),
    ("fedara", "fedara", {"score_beta": 0.3}, True),
    ("fedara_zero_pad", "fedara", {"averaging": "zero_pad"}, True),
    ("mixed_padding", "mixed_padding", {"pad_mix": 0.4}, True),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
# one configuration per registered name runs by default in the expensive tests; the variants
# run there under ``-m slow``.
PRIMARY = {"fedit", "hetlora", "rep_mean", "hafl_importance", "flexlora_sqrt_e", "flora", "fedex", "ffa",
           "fedsa", "fedara", "mixed_padding"}


def params_marking_variants_slow():
    """``pytest.param`` list over CONFIGS with the non-primary variants marked slow."""
    import pytest

    return [pytest.param(c, id=c[0], marks=() if c[0] in PRIMARY else pytest.mark.slow) for c in CONFIGS]


def build(cfg):
    _, name, hp, _ = cfg
    return ag.get_aggregator(name, **hp)


def make_case(seed=0, *, ranks=RANKS, with_e=False, dtype=jnp.float32, garbage=0.0, nan=False,
              identical=False):
    """Global tree, client stack, raw weights, masks, extras (``fedlora_jax.testing.make_case`` on
    :data:`MODULES`). Masked slots of clients hold ``garbage`` (random of that size) or NaN when
    ``nan``; real slots are random."""
    shapes = {k: lead + (n, m) for k, (lead, n, m) in MODULES.items()}
    return tuple(kit.make_case(seed, ranks=ranks, r_max=R, shapes=shapes, with_e=with_e, dtype=dtype,
                               garbage=garbage, nan=nan, identical=identical))


def to_np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_trees_close(x, y, atol=1e-5, rtol=1e-5):
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    assert tx == ty, (tx, ty)
    for u, v in zip(lx, ly, strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), atol=atol, rtol=rtol)
