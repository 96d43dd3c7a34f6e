"""The Mosaic (TPU Pallas) fused multi-client LoRA linear: numerics against the reference twin in
interpret mode, its block rules and HBM-traffic count, and a compilation by XLA:TPU for a v5e
chip on this CPU host (skipped, with the reason, only where libtpu is not installed)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.kernels import lora_matmul_tpu as tpu
from fedlora_jax.kernels.lora_matmul import fused_lora_linear, fused_lora_linear_reference

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def problem(c=2, t=64, n=256, m=384, r=8, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (c, t, n)).astype(dtype)
    w = (jax.random.normal(ks[1], (n, m)) / 16).astype(dtype)
    a = jax.random.normal(ks[2], (c, n, r)) / 16
    b = jax.random.normal(ks[3], (c, r, m))
    mask = (jax.random.uniform(ks[4], (c, r)) > 0.3).astype(jnp.float32)
    dy = jax.random.normal(ks[5], (c, t, m)).astype(dtype)
    return x, w, a, b, mask, dy


@pytest.mark.parametrize("blocks", [dict(), dict(block_t=16, block_m=128), dict(block_t=32, block_m=384)])
@pytest.mark.parametrize("use_mask", [True, False])
def test_forward_and_gradients_equal_the_reference(blocks, use_mask):
    x, w, a, b, mask, dy = problem()
    mask = mask if use_mask else None

    def kern(x_, a_, b_):
        return tpu.fused_lora_linear_tpu(x_, w, a_, b_, mask, scale=2.0, interpret=True, **blocks)

    def ref(x_, a_, b_):
        return fused_lora_linear_reference(x_, w, a_, b_, mask, scale=2.0)

    y, vjp = jax.vjp(kern, x, a, b)
    y_ref, vjp_ref = jax.vjp(ref, x, a, b)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    for g, g_ref in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_bfloat16_matches_the_reference_to_bf16_rounding():
    x, w, a, b, mask, dy = problem(dtype=jnp.bfloat16)
    y = tpu.fused_lora_linear_tpu(x, w, a, b, mask, scale=2.0, interpret=True)
    y_ref = fused_lora_linear_reference(x, w, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), mask, scale=2.0)
    assert y.dtype == jnp.bfloat16
    err = float(jnp.abs(y.astype(jnp.float32) - y_ref.astype(jnp.float32)).max())
    assert err <= 2e-2 * float(jnp.abs(y_ref.astype(jnp.float32)).max())


def test_the_switch_selects_mosaic_and_it_is_the_kernel():
    x, w, a, b, mask, _ = problem()
    y = fused_lora_linear(x, w, a, b, mask, scale=2.0, backend="mosaic", interpret=True)
    np.testing.assert_allclose(y, fused_lora_linear_reference(x, w, a, b, mask, scale=2.0), rtol=1e-5, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(lambda x_: fused_lora_linear(x_, w, a, b, mask, scale=2.0, backend="mosaic",
                                                           interpret=True))(x))
    assert "fused_lora_linear_tpu" in jaxpr
    with pytest.raises(ValueError, match="block_n does not apply"):
        fused_lora_linear(x, w, a, b, mask, scale=2.0, backend="mosaic", interpret=True, block_n=64)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            fused_lora_linear(x, w, a, b, mask, scale=2.0, backend="mosaic", interpret=False)


def test_block_rules_and_budget():
    assert tpu.pick_blocks(512, 2048, 2048, 16, jnp.bfloat16) == tpu.TpuBlocks(256, 2048)
    # a budget too small for the whole w column block halves block_m first (x read twice)
    small = tpu.vmem_bytes(512, 2048, 1024, 16, jnp.bfloat16)
    assert tpu.pick_blocks(512, 2048, 2048, 16, jnp.bfloat16, vmem_budget=small) == tpu.TpuBlocks(512, 1024)
    with pytest.raises(ValueError, match="block_m=100 must divide 384 and be a multiple of 128"):
        tpu.pick_blocks(64, 256, 384, 8, jnp.float32, block_m=100)
    with pytest.raises(ValueError, match="block_t=12 must divide 64 and be a multiple of 8"):
        tpu.pick_blocks(64, 256, 384, 8, jnp.float32, block_t=12)
    with pytest.raises(ValueError, match="multiple of 16"):
        tpu.pick_blocks(64, 256, 384, 8, jnp.bfloat16, block_t=8)
    with pytest.raises(ValueError, match="fit 0 MiB of VMEM"):
        tpu.pick_blocks(64, 256, 384, 8, jnp.float32, vmem_budget=1024)


def test_hbm_bytes_counts_each_block_fetch():
    c, t, n, m, r, isz = 4, 512, 256, 1024, 16, 2
    factors = (c * n * r + c * r * m) * isz + c * r * 4
    once = (c * t * n + n * m + c * t * m) * isz + factors
    assert tpu.hbm_bytes(c, t, n, m, r, jnp.bfloat16, tpu.TpuBlocks(128, m)) == once
    # four column blocks: x (and a, the gain) are fetched once per column block; w, b, y still once
    four = (4 * c * t * n + n * m + c * t * m) * isz + (4 * c * n * r + c * r * m) * isz + 4 * c * r * 4
    assert tpu.hbm_bytes(c, t, n, m, r, jnp.bfloat16, tpu.TpuBlocks(128, m // 4)) == four
    # the transposed read of w for dx moves the same bytes for the same blocks
    assert tpu.hbm_bytes(c, t, n, m, r, jnp.bfloat16, tpu.TpuBlocks(128, m), w_transposed=True) == once


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install "fedlora_jax[tpu-plan]")')
def test_compiles_for_a_v5e_chip_and_moves_fewer_bytes_than_xla():
    from fedlora_jax.plan import topology_devices

    dev = topology_devices("v5e:2x2")[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    c, t, n, m, r = 2, 256, 256, 512, 16
    shapes = [((c, t, n), jnp.bfloat16), ((n, m), jnp.bfloat16), ((c, n, r), jnp.bfloat16),
              ((c, r, m), jnp.bfloat16), ((c, r), jnp.float32), ((c, t, m), jnp.bfloat16)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes]

    def fwd_bwd(x, w, a, b, mask, dy):
        y, vjp = jax.vjp(lambda x_, a_, b_: tpu.fused_lora_linear_tpu(x_, w, a_, b_, mask, scale=2.0), x, a, b)
        return (y,) + vjp(dy)

    def bytes_accessed(f, *xs):
        with jax.default_device(dev):  # Mosaic's lowering reads the chip generation from the default device
            compiled = jax.jit(f).lower(*xs).compile()
        cost = compiled.cost_analysis()
        return compiled, (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

    compiled, _ = bytes_accessed(fwd_bwd, *args)
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2  # the forward and dx kernels
    _, kernel = bytes_accessed(lambda x, w, a, b, mask: tpu.fused_lora_linear_tpu(x, w, a, b, mask, scale=2.0),
                               *args[:5])
    _, reference = bytes_accessed(lambda x, w, a, b, mask: fused_lora_linear_reference(x, w, a, b, mask, scale=2.0),
                                  *args[:5])
    # XLA's count (tiled layouts, each kernel operand once: block_m = M here) against its own fusions
    assert tpu.pick_blocks(t, n, m, r, jnp.bfloat16).block_m == m
    assert kernel < 0.5 * reference
