"""Pallas kernels, installed as ``fedlora_jax.kernels``; each has a pure-jnp twin.

``lora_linear(x, w, a, b, mask, *, scale, impl="reference")`` is the switch the model code
calls; ``impl="pallas"`` selects the fused kernel (OFF by default until it wins on a GPU):
Triton on GPU, the Mosaic twin (:mod:`fedlora_jax.kernels.lora_matmul_tpu`) on TPU.
"""

from fedlora_jax.kernels.lora_matmul import (
    BLOCK_CONFIGS,
    DEFAULT_TARGET,
    IMPLS,
    BlockConfig,
    block_config,
    fused_lora_linear,
    fused_lora_linear_reference,
    lora_linear,
    padded_rank,
)
from fedlora_jax.kernels.lora_matmul_tpu import TpuBlocks, fused_lora_linear_tpu, hbm_bytes, pick_blocks

__all__ = [
    "BLOCK_CONFIGS",
    "DEFAULT_TARGET",
    "IMPLS",
    "BlockConfig",
    "block_config",
    "fused_lora_linear",
    "fused_lora_linear_reference",
    "lora_linear",
    "padded_rank",
    "TpuBlocks",
    "fused_lora_linear_tpu",
    "hbm_bytes",
    "pick_blocks",
]
