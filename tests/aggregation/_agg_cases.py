"""Random aggregation cases and the list of aggregator configurations under test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as ag
from fedlora_jax.lora import LoraFactors

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
]
CONFIG_IDS = [c[0] for c in CONFIGS]
# one configuration per registered name runs by default in the expensive tests; the variants
# run there under ``-m slow``.
PRIMARY = {"fedit", "hetlora", "rep_mean", "hafl_importance", "flexlora_sqrt_e", "flora", "fedex", "ffa",
           "fedsa", "fedara"}


def params_marking_variants_slow():
    """``pytest.param`` list over CONFIGS with the non-primary variants marked slow."""
    import pytest

    return [pytest.param(c, id=c[0], marks=() if c[0] in PRIMARY else pytest.mark.slow) for c in CONFIGS]


def build(cfg):
    _, name, hp, _ = cfg
    return ag.get_aggregator(name, **hp)


def prefix_masks(ranks, lead, r=R, dtype=jnp.float32):
    m = (np.arange(r)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)  # [C, R]
    m = m.reshape((len(ranks),) + (1,) * len(lead) + (r,))
    return jnp.asarray(np.broadcast_to(m, (len(ranks),) + lead + (r,)), dtype)


def make_case(seed=0, *, ranks=RANKS, with_e=False, dtype=jnp.float32, garbage=0.0, nan=False,
              identical=False):
    """Global tree, client stack, raw weights, masks, extras. Masked slots of clients hold
    ``garbage`` (random of that size) or NaN when ``nan``; real slots are random."""
    rng = np.random.default_rng(seed)
    junk = np.random.default_rng(seed + 1000)
    c = len(ranks)
    glob, clients, masks, scores = {}, {}, {}, {}
    for k, (lead, n, m) in MODULES.items():
        ga = rng.normal(size=lead + (n, R))
        gb = rng.normal(size=lead + (R, m))
        ge = rng.uniform(0.5, 1.5, size=lead + (R,)) if with_e else None
        ca = rng.normal(size=(c,) + lead + (n, R))
        cb = rng.normal(size=(c,) + lead + (R, m))
        ce = rng.uniform(0.5, 1.5, size=(c,) + lead + (R,)) if with_e else None
        if identical:
            ca[:] = ca[:1]
            cb[:] = cb[:1]
            if with_e:
                ce[:] = ce[:1]
        mk = np.asarray(prefix_masks(ranks, lead))
        if garbage or nan:
            fill = (lambda s: np.full(s, np.nan)) if nan else (lambda s: garbage * junk.normal(size=s))
            ca = np.where(mk[..., None, :] > 0, ca, fill(ca.shape))
            cb = np.where(mk[..., :, None] > 0, cb, fill(cb.shape))
            if with_e:
                ce = np.where(mk > 0, ce, fill(ce.shape))
        else:
            ca = ca * mk[..., None, :]
            cb = cb * mk[..., :, None]
            if with_e:
                ce = ce * mk
        cast = lambda x: None if x is None else jnp.asarray(x, dtype)
        glob[k] = LoraFactors(cast(ga), cast(gb), cast(ge))
        clients[k] = LoraFactors(cast(ca), cast(cb), cast(ce))
        masks[k] = jnp.asarray(mk)
        scores[k] = jnp.asarray(rng.uniform(0.1, 1.0, size=mk.shape) * mk, jnp.float32)
    weights = jnp.asarray(rng.uniform(1.0, 5.0, size=c), jnp.float32)
    return glob, clients, weights, masks, {"scores": scores}


def to_np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_trees_close(x, y, atol=1e-5, rtol=1e-5):
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    assert tx == ty, (tx, ty)
    for u, v in zip(lx, ly, strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), atol=atol, rtol=rtol)
