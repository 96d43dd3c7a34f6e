"""The round memory estimate: linear in chunk and batch, chunk choice, and XLA's own numbers.

Measured on CPU (jax 0.10.2, float32, the tiny encoder below: H=32, L=2, T=16, B=4, C=4,
chunk 2, S=2): estimate / (XLA temp + argument bytes) = 1.13. Other shapes tried while
writing this (H 64-128, L 2-4, T 32-128, B 4-8, chunk 2-4): 0.96 - 1.13.
"""

import jax
import numpy as np
import pytest
from reliability import _tiny_round as tr

from fedlora_jax.federated.memory import (
    MemoryBudgetError,
    MemoryEstimate,
    activation_bytes_per_layer,
    choose_chunk_size,
    device_memory_bytes,
    estimate_round_memory,
)
from fedlora_jax.models.gpt2 import GPT2Config
from fedlora_jax.models.llama import LlamaConfig

MIB = 2**20


def _est(cfg, **kw):
    args = dict(chunk_size=2, batch=4, seq_len=16, r_max=4, n_adapters=4, dtype_bytes=4)
    args.update(kw)
    return estimate_round_memory(cfg, **args)


def test_korthikanti_formula_in_bf16():
    # F = 4H, bf16: the paper's T B (34 H + 5 heads T).
    t, b, h, a = 128, 8, 256, 8
    got = activation_bytes_per_layer(batch=b, seq_len=t, hidden=h, intermediate=4 * h, heads=a, dtype_bytes=2)
    assert got == t * b * (34 * h + 5 * a * t)
    assert activation_bytes_per_layer(batch=b, seq_len=t, hidden=h, intermediate=4 * h, heads=a,
                                      dtype_bytes=4) == 2 * got


@pytest.mark.parametrize("cfg", [tr.tiny_config(), GPT2Config(vocab_size=100, hidden_size=32, num_layers=2,
                                                              num_heads=4, intermediate_size=64,
                                                              max_position_embeddings=32),
                                 LlamaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                             num_kv_heads=2, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=32)])
def test_linear_in_chunk_and_batch(cfg):
    e1, e2, e4 = (_est(cfg, chunk_size=k, num_clients=8) for k in (1, 2, 4))
    # total = const + chunk * per_client: equal second differences.
    assert e2.total_bytes - e1.total_bytes > 0
    assert e4.total_bytes - e2.total_bytes == 2 * (e2.total_bytes - e1.total_bytes)
    assert e2.total_bytes - e1.total_bytes == e1.activation_bytes_per_client + e1.optimizer_bytes_per_client
    b1, b2, b3 = (_est(cfg, batch=b).activation_bytes_per_client for b in (2, 4, 6))
    assert b3 - b2 == b2 - b1 > 0
    t1, t2, t3 = (_est(cfg, batch=b).total_bytes for b in (2, 4, 6))
    assert t3 - t2 == t2 - t1 > 0
    # Fewer trained layers, bf16 and remat all shrink activations.
    full = _est(cfg).activation_bytes_per_client
    assert _est(cfg, grad_cut=1).activation_bytes_per_client < full
    assert _est(cfg, dtype_bytes=2).activation_bytes_per_client < full
    assert _est(cfg, remat=True).activation_bytes_per_client < full


def test_base_bytes_exact_param_count():
    cfg = tr.tiny_config()
    h, f, v, p, L = 32, 128, 64, 16, 2  # head (classifier) excluded from the base
    n = (v + p + 2) * h + 2 * h + L * (4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h)
    assert _est(cfg).base_bytes == 4 * n
    assert _est(cfg, base_param_bytes=2).base_bytes == 2 * n


def test_trainable_bytes_count():
    cfg = tr.tiny_config()  # H = 32, 3 labels
    e = _est(cfg, r_max=4, n_adapters=4)
    lora = 4 * 4 * (32 + 32)
    assert e.optimizer_bytes_per_client == 5 * 4 * (lora + 32 * 3 + 3)
    e2 = _est(cfg, r_max=4, n_adapters=2, adapter_dims_sum=(32 + 128) + (128 + 32))
    assert e2.optimizer_bytes_per_client == 5 * 4 * (4 * 320 + 32 * 3 + 3)


def test_choose_chunk_size_picks_largest_fitting():
    per, const = 100, 1000
    fn = lambda k: const + per * k
    # budget = 0.8 * limit; limit 2000 -> 1600 -> largest k with 1000 + 100 k <= 1600 is 6.
    assert choose_chunk_size(16, fn, 2000) == 6
    assert choose_chunk_size(4, fn, 2000) == 4          # requested is an upper bound
    assert choose_chunk_size(16, fn, 2000, safety=1.0) == 10
    assert choose_chunk_size(1, fn, 2000) == 1
    # Brute force reference over many budgets.
    for limit in range(1400, 4000, 37):
        ref = max(k for k in range(1, 17) if fn(k) <= 0.8 * limit) if fn(1) <= 0.8 * limit else None
        if ref is not None:
            assert choose_chunk_size(16, fn, limit) == ref


def test_choose_chunk_size_error_says_what_to_change():
    cfg = tr.tiny_config()
    fn = lambda k: _est(cfg, chunk_size=k)
    need = fn(1).total_bytes
    with pytest.raises(MemoryBudgetError) as err:
        choose_chunk_size(8, fn, need)  # 0.8 * need < need
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for word in ("chunk_size=1", "batch_size", "max_length", "bfloat16", "remat"):
        assert word in msg
    with pytest.raises(ValueError, match="safety"):
        choose_chunk_size(8, fn, need, safety=0)
    with pytest.raises(ValueError, match="limit_bytes"):
        choose_chunk_size(8, fn, -1)


def test_estimate_argument_errors():
    cfg = tr.tiny_config()
    with pytest.raises(ValueError, match="chunk_size"):
        _est(cfg, chunk_size=0)
    with pytest.raises(ValueError, match="grad_cut"):
        _est(cfg, grad_cut=3)
    with pytest.raises(TypeError, match="model_config"):
        _est(object())


def test_device_memory_bytes_positive():
    got = device_memory_bytes()
    assert isinstance(got, int) and got > 2**20
    if jax.devices()[0].platform == "cpu":
        with open("/proc/meminfo") as fh:
            total = int(next(x for x in fh if x.startswith("MemTotal:")).split()[1]) * 1024
        assert got <= total


def test_estimate_vs_xla_memory_analysis():
    """Order of magnitude against the compiled round's temp + argument bytes (CPU)."""
    t = tr.build(0, clients=4, chunk=2, steps=2, batch=4, seq_len=16)
    compiled = t.round_fn.jitted.lower(t.state, t.batch, t.spec, jax.random.key(0), t.base).compile()
    ma = compiled.memory_analysis()
    if ma is None or not hasattr(ma, "temp_size_in_bytes"):
        pytest.skip("compiled.memory_analysis() is not available on this backend")
    measured = ma.temp_size_in_bytes + ma.argument_size_in_bytes
    est = estimate_round_memory(t.cfg, chunk_size=2, batch=4, seq_len=16, r_max=4, n_adapters=len(t.targets),
                                dtype_bytes=4, steps=2, num_clients=4)
    assert isinstance(est, MemoryEstimate)
    ratio = est.total_bytes / measured
    print(f"estimate {est.total_bytes / MIB:.2f} MiB / measured {measured / MIB:.2f} MiB = {ratio:.2f}")
    assert 0.25 <= ratio <= 4.0, (ratio, est.describe())
    assert np.isfinite(ratio)
