"""Write tiny random-weight Hugging Face checkpoints and their reference outputs.

Run (needs torch + transformers; the outputs are committed so the tests need neither):

    /work/venv/bin/python tests/models/generate_goldens.py

For each of bert, roberta, gpt2, llama (untied, GQA 4/2, rope_theta 5e5) and qwen2 (tied,
q/k/v bias, GQA 4/1, rope_theta 1e6) it writes ``goldens/<name>/`` (``config.json`` +
``model.safetensors``, float32) and ``goldens/<name>.npz`` with ``input_ids [B, T]``,
``attention_mask [B, T]`` (row 0 full, the others right-padded) and the reference outputs:
``logits`` (``BertForSequenceClassification``, or the causal LM's ``[B, T, V]``), ``hidden``
(the encoder's last hidden state). RoBERTa's reference is ``RobertaModel`` (with pooler):
``hidden`` and ``pooled``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers as tf

OUT = Path(__file__).parent / "goldens"
B, T = 3, 12
SEED = 0


def _inputs(vocab: int, pad_id: int, rng: np.random.Generator, low: int = 3):
    ids = rng.integers(low, vocab, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, n_valid in enumerate((T, T - 4, 5)):
        mask[b, n_valid:] = 0
        ids[b, n_valid:] = pad_id
    return ids, mask


def _perturb(model):
    """HF init leaves biases at 0 and norm scales at 1; jitter every 1-D parameter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(name: str, model, arrays: dict) -> None:
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    np.savez_compressed(OUT / f"{name}.npz", **arrays)


@torch.no_grad()
def bert(rng):
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                        num_labels=3, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = _perturb(tf.BertForSequenceClassification(cfg).eval())
    ids, mask = _inputs(cfg.vocab_size, 0, rng)
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
    _save("bert", model, dict(input_ids=ids, attention_mask=mask, logits=out.logits.numpy(),
                              hidden=out.hidden_states[-1].numpy()))


@torch.no_grad()
def roberta(rng):
    cfg = tf.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=34, type_vocab_size=1, pad_token_id=1)
    cfg._attn_implementation = "eager"
    model = _perturb(tf.RobertaModel(cfg, add_pooling_layer=True).eval())
    ids, mask = _inputs(cfg.vocab_size, 1, rng)
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    _save("roberta", model, dict(input_ids=ids, attention_mask=mask,
                                 hidden=out.last_hidden_state.numpy(),
                                 pooled=out.pooler_output.numpy()))


@torch.no_grad()
def _causal(name, model, vocab, rng):
    _perturb(model)
    ids, mask = _inputs(vocab, 0, rng)
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    _save(name, model, dict(input_ids=ids, attention_mask=mask, logits=out.logits.numpy()))


def gpt2(rng):
    cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    _causal("gpt2", tf.GPT2LMHeadModel(cfg).eval(), cfg.vocab_size, rng)


def llama(rng):
    cfg = tf.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rope_theta=500000.0,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    _causal("llama", tf.LlamaForCausalLM(cfg).eval(), cfg.vocab_size, rng)


def qwen2(rng):
    cfg = tf.Qwen2Config(vocab_size=103, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=64, rope_theta=1000000.0,
                         tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    _causal("qwen2", tf.Qwen2ForCausalLM(cfg).eval(), cfg.vocab_size, rng)


def main():
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    for fn in (bert, roberta, gpt2, llama, qwen2):
        fn(rng)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote goldens to {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
