"""fedlora_jax.models: our Flax NNX models, offline Hugging Face loading, PEFT import/export.

GGUF (llama.cpp) Llama files load through ``from_pretrained`` / ``load_tokenizer`` too
(:mod:`fedlora_jax.models.gguf`). See docs/architecture.md for the call contract::

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
from fedlora_jax.models.generate import GenerateOutput, Generator, generate, make_generate
from fedlora_jax.models.gguf import (
    GGUFError,
    config_from_gguf,
    load_gguf,
    load_gguf_tensors,
    load_gguf_tokenizer,
    read_gguf_metadata,
)
from fedlora_jax.models.gpt2 import GPT2LM, GPT2Config
from fedlora_jax.models.llama import KVCache, LlamaConfig, LlamaLM
from fedlora_jax.models.loading import (
    config_from_hf,
    from_pretrained,
    load_hf_weights,
    load_tokenizer,
    resolve_gguf_file,
    resolve_model_dir,
)
from fedlora_jax.models.peft_io import export_peft, import_peft, import_peft_head, peft_targets
from fedlora_jax.models.switches import resolve_switches

__all__ = [
    "EncoderClassifier",
    "EncoderConfig",
    "GGUFError",
    "GPT2Config",
    "GPT2LM",
    "GenerateOutput",
    "Generator",
    "KVCache",
    "LlamaConfig",
    "LlamaLM",
    "TargetInfo",
    "config_from_gguf",
    "config_from_hf",
    "export_peft",
    "peft_targets",
    "from_pretrained",
    "functional_forward",
    "generate",
    "make_generate",
    "import_peft",
    "import_peft_head",
    "load_gguf",
    "load_gguf_tensors",
    "load_gguf_tokenizer",
    "load_hf_weights",
    "load_tokenizer",
    "merge_lora_into_base",
    "read_gguf_metadata",
    "resolve_gguf_file",
    "resolve_model_dir",
    "resolve_switches",
    "split_for_round",
]
