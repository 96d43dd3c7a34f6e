"""fedlora_jax: federated LoRA fine-tuning on heterogeneous clients, as pure JAX functions.

Subpackages (see ``docs/architecture.md`` for the contracts):

- ``lora``: factors, masks, apply / merge / unmerge, parameter and byte counts.
- ``linalg``: batched truncated SVD of low-rank products (QR core), references, safe gradients.
- ``importance``: AdaLoRA sensitivity, EMA, triplet scores, cubic budget, top-k masks.
- ``aggregation``: the ``Aggregator`` contract and every server method.
- ``algorithms``: FedARA, HAFL, LEGEND and the baselines as compositions.
- ``federated``: ``ClientSpec``, client update, the one-jit round, sharding.
- ``devices``: device profiles and the cost model.
- ``models``, ``data``, ``driver`` (loaded on first use: they import transformers/datasets).
- ``testing``: the aggregator conformance battery, ``check_aggregator`` (loaded on first use).
"""

import importlib

from fedlora_jax import aggregation, algorithms, devices, federated, importance, linalg, lora
from fedlora_jax.aggregation import Aggregator, get_aggregator
from fedlora_jax.federated import ClientSpec, ServerState, make_round
from fedlora_jax.lora import LoraFactors, LoraTree, MaskTree

__version__ = "0.1.0"

_LAZY = ("models", "data", "driver", "kernels", "testing")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"fedlora_jax.{name}")
    raise AttributeError(f"module 'fedlora_jax' has no attribute {name!r}")


__all__ = [
    "Aggregator",
    "ClientSpec",
    "LoraFactors",
    "LoraTree",
    "MaskTree",
    "ServerState",
    "__version__",
    "aggregation",
    "algorithms",
    "data",
    "devices",
    "driver",
    "federated",
    "get_aggregator",
    "importance",
    "kernels",
    "linalg",
    "lora",
    "make_round",
    "models",
    "testing",
]
