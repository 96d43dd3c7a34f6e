"""experiments/examples/custom_aggregator.py passes the public battery; broken aggregators fail it, by name."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from fedlora_jax.aggregation import Aggregator
from fedlora_jax.lora import LoraFactors
from fedlora_jax.testing import check_aggregator, check_weight_scale_invariance

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "examples" / "custom_aggregator.py"


def _load():
    spec = importlib.util.spec_from_file_location("example_custom_aggregator", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_script_passes_the_battery():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "passes the fedlora_jax conformance battery" in out.stdout


def _naive_mean(normalise=True):
    """Weighted mean of the raw client factors: ignores the masks (masked slots leak) and, with
    ``normalise=False``, the weights' scale."""

    def aggregate(glob, clients, weights, masks, state, *, extras=None):
        p = weights / jnp.sum(weights) if normalise else weights
        return {k: LoraFactors(jnp.tensordot(p, f.a, 1).astype(f.a.dtype), jnp.tensordot(p, f.b, 1).astype(f.b.dtype),
                               glob[k].e) for k, f in clients.items()}, state

    return Aggregator(lambda g: (), aggregate, lambda g, m, s=None, *, client_lora=None: g, ("a", "b"), ("a", "b"),
                      "naive_mean")


def test_leaky_aggregator_fails_naming_the_property_and_module():
    with pytest.raises(AssertionError, match=r"^\[masked_slots \(garbage in masked slots\)\] new_global\['layer.*rank slot"):
        check_aggregator(_naive_mean(), grad=False)


def test_skip_moves_on_to_the_next_failed_property():
    with pytest.raises(AssertionError, match=r"^\[zero_weight"):
        check_aggregator(_naive_mean(), skip=("masked_slots",), grad=False)


def test_unnormalised_weights_fail_weight_scale():
    with pytest.raises(AssertionError, match=r"^\[weight_scale \(weights x 7.0\)\].*worst at index"):
        check_weight_scale_invariance(_naive_mean(normalise=False))


def test_example_aggregator_is_importable_and_clips():
    mod = _load()
    agg = mod.clipped_fedavg(max_norm=1.0)
    check_aggregator(agg, checks=("contract", "shapes_and_dtypes", "masked_slots", "zero_weight", "distribute"))
    with pytest.raises(AssertionError, match=r"^\[identical_clients"):   # clipping changes a lone client
        check_aggregator(agg, checks=("identical_clients",))
