"""Fused multi-client LoRA linear: Pallas kernel (interpret mode on CPU) vs jnp twin vs NumPy.

On a GPU machine the same file also runs the compiled (Triton) kernel: ``pytest tests/kernels``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from fedlora_jax import lora
from fedlora_jax.kernels import (
    BLOCK_CONFIGS,
    BlockConfig,
    block_config,
    fused_lora_linear,
    fused_lora_linear_reference,
    lora_linear,
    padded_rank,
)
from fedlora_jax.kernels import lora_matmul as lm

# Tolerances written once, per dtype: (atol, rtol) on values scaled to O(1).
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 5e-2)}
SCALE = 0.75
ON_GPU = jax.default_backend() == "gpu"


def make_inputs(c=3, t=32, n=64, m=48, r=4, dtype=jnp.float32, seed=0):
    """Random ``x [C,T,N]``, ``w [N,M]``, ``a [C,N,R]``, ``b [C,R,M]``, mixed masks ``[C,R]``."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (c, t, n), jnp.float32)
    w = jax.random.normal(ks[1], (n, m), jnp.float32) / np.sqrt(n)
    a = jax.random.normal(ks[2], (c, n, r), jnp.float32) / np.sqrt(n)
    b = jax.random.normal(ks[3], (c, r, m), jnp.float32)
    mask = (np.arange(c * r).reshape(c, r) % 3 != 1).astype(np.float32)
    mask[-1] = 0.0  # last client: no active rank
    cast = lambda v: v.astype(dtype)
    return cast(x), cast(w), cast(a), cast(b), jnp.asarray(mask)


def numpy_loop(x, w, a, b, mask, scale):
    """Python-loop float64 reference of ``y_c = x_c w + scale ((x_c a_c) * m_c) b_c``."""
    x, w, a, b, mask = (np.asarray(v, np.float64) for v in (x, w, a, b, mask))
    out = []
    for c in range(x.shape[0]):
        out.append(x[c] @ w + scale * ((x[c] @ a[c]) * mask[c]) @ b[c])
    return np.stack(out)


def assert_close(got, want, dtype):
    atol, rtol = TOL[jnp.dtype(dtype).name]
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol * max(1.0, np.abs(want).max()), rtol=rtol)


def loss(fn, x, w, a, b, mask, **kw):
    """A scalar with a non-uniform cotangent, so every output entry matters."""
    y = fn(x, w, a, b, mask, scale=SCALE, **kw).astype(jnp.float32)
    return jnp.sum(jnp.sin(y) * jnp.linspace(0.5, 1.5, y.shape[-1]))


@functools.cache
def pallas_jit(**kw):
    return jax.jit(functools.partial(fused_lora_linear, scale=SCALE, **kw))


@functools.cache
def grads_jit(impl: str, **kw):
    fn = fused_lora_linear_reference if impl == "reference" else fused_lora_linear
    g = jax.grad(lambda x, a, b, w, mask: loss(fn, x, w, a, b, mask, **kw), argnums=(0, 1, 2))
    return jax.jit(g)


# ----------------------------------------------------------------------------- the twin


def test_reference_matches_numpy_loop():
    x, w, a, b, mask = make_inputs()
    got = fused_lora_linear_reference(x, w, a, b, mask, scale=SCALE)
    assert_close(got, numpy_loop(x, w, a, b, mask, SCALE), jnp.float32)


def test_reference_is_vmap_of_lora_apply():
    x, w, a, b, mask = make_inputs()
    want = jax.vmap(lambda xc, ac, bc, mc: lora.apply(xc, w, lora.LoraFactors(ac, bc), mc,
                                                      scale=SCALE))(x, a, b, mask)
    got = fused_lora_linear_reference(x, w, a, b, mask, scale=SCALE)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_twin_and_numpy(dtype):
    x, w, a, b, mask = make_inputs(dtype=dtype)
    got = pallas_jit()(x, w, a, b, mask)
    assert got.dtype == dtype and got.shape == (3, 32, 48)
    assert_close(got, fused_lora_linear_reference(x, w, a, b, mask, scale=SCALE), dtype)
    assert_close(got, numpy_loop(x, w, a, b, mask, SCALE), dtype)


def test_forward_many_tiles_and_k_steps():
    """Small explicit blocks: 2 T tiles x 3 M tiles x 4 K steps per program, odd rank 5."""
    x, w, a, b, mask = make_inputs(r=5, seed=1)
    got = pallas_jit(block_t=16, block_m=16, block_n=16)(x, w, a, b, mask)
    assert_close(got, numpy_loop(x, w, a, b, mask, SCALE), jnp.float32)


def test_client_axis_handled_by_kernel():
    """No vmap: one call over C clients equals C single-client calls (a Python loop)."""
    x, w, a, b, mask = make_inputs()
    full = pallas_jit()(x, w, a, b, mask)
    for c in range(x.shape[0]):
        one = pallas_jit()(x[c:c + 1], w, a[c:c + 1], b[c:c + 1], mask[c:c + 1])
        np.testing.assert_allclose(np.asarray(one[0]), np.asarray(full[c]), atol=1e-6)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grads_match_twin(dtype):
    x, w, a, b, mask = make_inputs(dtype=dtype)
    got = grads_jit("pallas")(x, a, b, w, mask)
    want = grads_jit("reference")(x, a, b, w, mask)
    for name, g, r in zip(("x", "a", "b"), got, want, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, r, dtype)


def test_grads_with_explicit_blocks_match_twin():
    x, w, a, b, mask = make_inputs(r=5, seed=2)
    got = grads_jit("pallas", block_t=16, block_m=16, block_n=16)(x, a, b, w, mask)
    want = grads_jit("reference")(x, a, b, w, mask)
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, jnp.float32)


def test_w_and_mask_get_zero_gradient():
    x, w, a, b, mask = make_inputs()
    gw, gm = jax.grad(lambda w, m: loss(fused_lora_linear, x, w, a, b, m), argnums=(0, 1))(w, mask)
    assert not np.any(np.asarray(gw)) and not np.any(np.asarray(gm))


# ----------------------------------------------------------------------------- masks


def test_masked_ranks_contribute_nothing_and_get_zero_grads():
    x, w, a, b, mask = make_inputs()
    off = np.asarray(mask) == 0                                                # [C, R]
    noise = jax.random.normal(jax.random.key(9), a.shape)
    a2 = jnp.where(off[:, None, :], a + noise, a)                 # change only masked columns
    b2 = jnp.where(off[:, :, None], b + 3.0, b)                   # and masked rows
    y1 = pallas_jit()(x, w, a, b, mask)
    y2 = pallas_jit()(x, w, a2, b2, mask)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-6)
    # the fully masked client is the base layer alone
    np.testing.assert_allclose(np.asarray(y1[-1]), np.asarray(x[-1] @ w), atol=1e-4)
    _, ga, gb = grads_jit("pallas")(x, a, b, w, mask)
    assert not np.any(np.asarray(ga)[np.broadcast_to(off[:, None, :], ga.shape)])
    assert not np.any(np.asarray(gb)[np.broadcast_to(off[:, :, None], gb.shape)])
    assert np.any(np.asarray(ga)) and np.any(np.asarray(gb))


def test_mask_none_means_all_ranks():
    x, w, a, b, _ = make_inputs()
    ones = jnp.ones((3, 4), jnp.float32)
    np.testing.assert_allclose(np.asarray(fused_lora_linear(x, w, a, b, None, scale=SCALE)),
                               np.asarray(pallas_jit()(x, w, a, b, ones)), atol=1e-6)


# ----------------------------------------------------------------------------- jit, switch


def test_jit_traces_once():
    x, w, a, b, mask = make_inputs()
    traces = []

    @jax.jit
    def f(x, a, b):
        traces.append(1)
        return fused_lora_linear(x, w, a, b, mask, scale=SCALE)

    y1 = f(x, a, b)
    y2 = f(x + 1.0, a, b)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(y1), np.asarray(y2))


def test_switch_defaults_to_reference_and_flattens_tokens():
    x, w, a, b, mask = make_inputs()
    x4 = x.reshape(3, 2, 16, 64)                                                 # [C, B, T, N]
    ref = lora_linear(x4, w, a, b, mask, scale=SCALE)
    assert ref.shape == (3, 2, 16, 48)
    np.testing.assert_array_equal(
        np.asarray(ref).reshape(3, 32, 48),
        np.asarray(fused_lora_linear_reference(x, w, a, b, mask, scale=SCALE)))
    pal = lora_linear(x4, w, a, b, mask, scale=SCALE, impl="pallas")
    assert_close(pal, ref, jnp.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        lora_linear(x4, w, a, b, mask, scale=SCALE, impl="triton")


# ----------------------------------------------------------------------------- validation


def test_block_config_table_and_default():
    assert block_config(jnp.bfloat16, 768, 768, 8, 2048) == BLOCK_CONFIGS[("bfloat16", 768, 768, 8)]
    cfg = block_config(jnp.float32, 64, 48, 4, 32)                       # default, shrunk
    assert (cfg.block_t, cfg.block_m, cfg.block_n) == (32, 16, 64)
    assert isinstance(cfg, BlockConfig)
    assert padded_rank(4) == 16 and padded_rank(16) == 16 and padded_rank(17) == 32


@pytest.mark.parametrize("kw, shape_kw, match", [
    (dict(block_t=16), dict(t=24), "block_t=16 does not divide T=24"),
    (dict(block_m=24), dict(), "block_m=24 must be a power of two >= 16"),
    (dict(block_n=8), dict(), "block_n=8 must be a power of two >= 16"),
    (dict(), dict(t=8), "T=8 has no power-of-two block >= 16"),
    (dict(), dict(m=20), "M=20 has no power-of-two block"),
])
def test_non_divisible_shapes_rejected(kw, shape_kw, match):
    x, w, a, b, mask = make_inputs(**shape_kw)
    with pytest.raises(ValueError, match=match):
        fused_lora_linear(x, w, a, b, mask, scale=SCALE, **kw)


def test_bad_inputs_rejected_before_tracing():
    x, w, a, b, mask = make_inputs()
    with pytest.raises(ValueError, match=r"a has shape \(3, 32, 4\), expected \(3, 64, 4\)"):
        fused_lora_linear(x, w, a[:, :32], b, mask, scale=SCALE)
    with pytest.raises(ValueError, match="mask has shape"):
        fused_lora_linear(x, w, a, b, mask[:, :2], scale=SCALE)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        fused_lora_linear(x[0], w, a, b, mask, scale=SCALE)
    with pytest.raises(TypeError, match="x dtype must be one of"):
        fused_lora_linear(x.astype(jnp.float16), w, a, b, mask, scale=SCALE)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        fused_lora_linear(x, w, a, b, mask, scale=jnp.float32(0.5))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lora_linear(x, w, a, b, mask, scale=SCALE, backend="mosaic_gpu")
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            fused_lora_linear(x, w, a, b, mask, scale=SCALE, interpret=False)


# ----------------------------------------------------------------------------- compiled (GPU)


@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_gpu_matches_twin(dtype):
    """Compiled Triton kernel vs twin; XLA's f32 matmuls forced to full precision (no TF32)."""
    x, w, a, b, mask = make_inputs(c=4, t=256, n=768, m=768, r=8, dtype=dtype)
    with jax.default_matmul_precision("highest"):
        _compiled_checks(x, w, a, b, mask, dtype)


def _compiled_checks(x, w, a, b, mask, dtype):
    got = pallas_jit(interpret=False)(x, w, a, b, mask)
    assert_close(got, fused_lora_linear_reference(x, w, a, b, mask, scale=SCALE), dtype)
    g = grads_jit("pallas", interpret=False)(x, a, b, w, mask)
    r = grads_jit("reference")(x, a, b, w, mask)
    for gi, ri in zip(g, r, strict=True):
        assert_close(gi, ri, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_ir_for_cuda(dtype):
    """No GPU needed: Pallas -> Triton IR lowering (power-of-two loads, dots, loop) succeeds for
    the forward and the dx kernel at RoBERTa-base shapes. PTX compilation still needs a GPU."""
    c, t, n, m, r = 2, 256, 768, 768, 8
    spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
    static = lm._Static(SCALE, block_config(dtype, n, m, r, t), block_config(dtype, m, n, r, t),
                        interpret=False)

    def value_and_grads(x, a, b, w, mask):
        fn = lambda x, a, b: jnp.sum(lm._fused_lora(static, x, w, a, b, mask).astype(jnp.float32))
        return jax.value_and_grad(fn, argnums=(0, 1, 2))(x, a, b)

    triton = "__gpu$xla.gpu.triton"
    exp = export.export(jax.jit(value_and_grads), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
        spec(c, t, n), spec(c, n, r), spec(c, r, m), spec(n, m), spec(c, r, dt=jnp.float32))
    assert exp.mlir_module().count(f"@{triton}(") == 2                 # forward + dx kernels
