"""fedlora_jax.data: offline loading, tokenization cache, partitioners, static client batches.

See docs/architecture.md. Host-side NumPy; nothing here is traced by JAX.
"""

from fedlora_jax.data.batching import (
    POLICIES,
    ClientBatches,
    EvalBatches,
    client_example_order,
    client_rng,
    eval_batches,
    make_client_batches,
)
from fedlora_jax.data.loading import (
    NAMED_DATASETS,
    CausalLMDataset,
    TextDataset,
    detect_text_column,
    encode_labels,
    load_causal_lm,
    load_hf_split,
    load_text_classification,
    resolve_source,
    shared_data_dir,
)
from fedlora_jax.data.partition import (
    dirichlet_partition,
    iid_partition,
    partition_summary,
    partition_table,
    power_law_sizes,
    quantity_skew_partition,
    shard_partition,
    validate_partition,
)
from fedlora_jax.data.prefetch import Prefetcher
from fedlora_jax.data.tokenization import (
    IGNORE_INDEX,
    CacheInfo,
    TokenizedDataset,
    cache_key,
    dataset_fingerprint,
    tokenize,
    tokenize_uncached,
    tokenizer_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "NAMED_DATASETS",
    "POLICIES",
    "CacheInfo",
    "CausalLMDataset",
    "ClientBatches",
    "EvalBatches",
    "Prefetcher",
    "TextDataset",
    "TokenizedDataset",
    "cache_key",
    "client_example_order",
    "client_rng",
    "dataset_fingerprint",
    "detect_text_column",
    "dirichlet_partition",
    "encode_labels",
    "eval_batches",
    "iid_partition",
    "load_causal_lm",
    "load_hf_split",
    "load_text_classification",
    "make_client_batches",
    "partition_summary",
    "partition_table",
    "power_law_sizes",
    "quantity_skew_partition",
    "resolve_source",
    "shard_partition",
    "shared_data_dir",
    "tokenize",
    "tokenize_uncached",
    "tokenizer_fingerprint",
    "validate_partition",
]
