"""Write a tiny random-weight Llama checkpoint directory (HF layout) with a character-level
tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with a chat template).

Lets causal-LM tests run the real loading code (config.json + model.safetensors + tokenizer
files) offline in seconds.
"""

import json
import string
from pathlib import Path

import numpy as np

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_char_tokenizer(path, *, chat_template: bool = True) -> int:
    """Write the tokenizer files into ``path``; returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
           "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 128}
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(vocab)


def write_tiny_llama(path, *, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, max_pos=128,
                     seed=0, chat_template: bool = True, tie: bool = False) -> Path:
    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    from fedlora_jax.models import llama

    path = Path(path)
    vocab = write_char_tokenizer(path, chat_template=chat_template)
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
          "head_dim": hidden // heads, "intermediate_size": intermediate, "vocab_size": vocab,
          "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "hidden_act": "silu", "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0}
    (path / "config.json").write_text(json.dumps(hf))
    cfg = llama.LlamaConfig.from_hf_config(hf)
    abstract = nnx.eval_shape(lambda: llama.LlamaLM(cfg, rngs=nnx.Rngs(0)))
    flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(abstract))}
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (p, transpose) in llama.hf_key_table(cfg).items():
        shape = tuple(flat[p].shape)
        if transpose:
            shape = shape[::-1]
        if p[-1] == "scale":
            arr = np.ones(shape, np.float32)
        else:
            arr = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        tensors["model." + name if not name.startswith("lm_head") else name] = arr
    del jax
    save_file(tensors, str(path / "model.safetensors"))
    return path
