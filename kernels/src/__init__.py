"""Pallas kernels, installed as ``fedlora_jax.kernels``; each has a pure-jnp twin.

``lora_linear(x, w, a, b, mask, *, scale, impl="reference")`` is the switch the model code
calls; ``impl="pallas"`` selects the fused kernel (OFF by default until it wins on a GPU).
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
]
