"""Helpers for tests/models: golden checkpoints and small adapter trees."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import from_pretrained

GOLDENS = Path(__file__).parent / "goldens"
ARCHS = ("bert", "roberta", "gpt2", "llama", "qwen2")
# Tolerance of our float32 outputs vs transformers (float32, eager attention), written once.
F32_ATOL = 1e-4
F32_RTOL = 1e-4

_CACHE: dict = {}


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / f"{name}.npz") as z:
        return dict(z)


def load_golden_model(name: str, **kw):
    """The tiny golden checkpoint as our model (cached per kwargs; do not mutate)."""
    cache_key = (name, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = from_pretrained(GOLDENS / name, key=jax.random.key(0), **kw)
    return _CACHE[cache_key]


def random_lora(model, key, *, r_max=4, modules=None, layers=None, std=0.3):
    """Factors with nonzero ``a`` and ``b`` (so the adapter changes outputs)."""
    targets = model.adapter_targets(modules, layers)
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    return lora_lib.init(key, shapes, r_max, scheme="a_random_b_zero", std=std), targets


def nonzero_b(tree, key, std=0.3):
    out = {}
    keys = jax.random.split(key, len(tree))
    for k, (name, f) in zip(keys, sorted(tree.items()), strict=True):
        out[name] = lora_lib.LoraFactors(f.a, std * jax.random.normal(k, f.b.shape), f.e)
    return out


def inputs(name):
    z = golden(name)
    return jnp.asarray(z["input_ids"]), jnp.asarray(z["attention_mask"])
