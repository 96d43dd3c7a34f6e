"""The CPU chunk cap: the arithmetic rule, its input checks, and the driver applying it."""

import pytest

from fedlora_jax.federated import cpu_cache_chunk_cap


def test_cap_arithmetic():
    # MiniLM shape: 8 * 64 * 1536 * 4 bytes = 3 MiB per client -> 2 clients within 8 MiB
    assert cpu_cache_chunk_cap(8, 64, 1536) == 2
    assert cpu_cache_chunk_cap(8, 64, 1536, itemsize=2) == 5
    assert cpu_cache_chunk_cap(1, 16, 64) == 2048
    assert cpu_cache_chunk_cap(64, 512, 3072) == 1          # never below one client
    assert cpu_cache_chunk_cap(8, 64, 1536, cache_bytes=12 * 2**20) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_cap_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="batch"):
        cpu_cache_chunk_cap(bad, 64, 1536)


def test_driver_caps_chunk_on_cpu():
    import types

    import jax

    from fedlora_jax.driver.config import ExperimentConfig
    from fedlora_jax.driver.setup import _fit_chunk_size
    from fedlora_jax.models.bert import EncoderConfig
    from fedlora_jax.models.common import TargetInfo

    if jax.default_backend() != "cpu":
        pytest.skip("the cap applies on the CPU backend only")
    model = types.SimpleNamespace(config=EncoderConfig())            # MiniLM dims, F = 1536
    targets = {f"layer.{i}.query": TargetInfo(i, "query", 384, 384) for i in range(6)}
    cfg = ExperimentConfig(chunk_size=8, clients_per_round=8, batch_size=8, max_length=64)
    assert _fit_chunk_size(cfg, model, targets) == 2
    small = ExperimentConfig(chunk_size=3, clients_per_round=8, batch_size=1, max_length=16)
    assert _fit_chunk_size(small, model, targets) == 3               # the request is the bound
