"""fedlora_jax: federated LoRA fine-tuning on heterogeneous clients, as pure JAX functions.

Subpackages (see docs/architecture.md): ``lora``, ``linalg``, ``importance``,
``aggregation``, ``algorithms``, ``federated``, ``devices``, ``models``, ``data``, ``driver``.
"""

from fedlora_jax import lora
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

__version__ = "0.1.0"

__all__ = ["LoraFactors", "LoraTree", "MaskTree", "__version__", "lora"]
