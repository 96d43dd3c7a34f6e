"""fedlora_jax.models: our Flax NNX models, offline Hugging Face loading, PEFT import/export.

See docs/architecture.md for the call contract::

    logits = model(input_ids, attention_mask, *, lora=None, masks=None, scale=1.0,
                   grad_cut_layer=None)
"""

from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import (
    TargetInfo,
    functional_forward,
    merge_lora_into_base,
    split_for_round,
)
from fedlora_jax.models.gpt2 import GPT2LM, GPT2Config
from fedlora_jax.models.llama import LlamaConfig, LlamaLM
from fedlora_jax.models.loading import (
    config_from_hf,
    from_pretrained,
    load_hf_weights,
    load_tokenizer,
    resolve_model_dir,
)
from fedlora_jax.models.peft_io import export_peft, import_peft, import_peft_head, peft_targets
from fedlora_jax.models.switches import resolve_switches

__all__ = [
    "EncoderClassifier",
    "EncoderConfig",
    "GPT2Config",
    "GPT2LM",
    "LlamaConfig",
    "LlamaLM",
    "TargetInfo",
    "config_from_hf",
    "export_peft",
    "peft_targets",
    "from_pretrained",
    "functional_forward",
    "import_peft",
    "import_peft_head",
    "load_hf_weights",
    "load_tokenizer",
    "merge_lora_into_base",
    "resolve_model_dir",
    "resolve_switches",
    "split_for_round",
]
