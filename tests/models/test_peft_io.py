"""PEFT adapter export/import: round trip, bad files, and peft loading our adapter."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models._helpers import GOLDENS, inputs, load_golden_model, nonzero_b, random_lora
from safetensors.numpy import load_file, save_file

from fedlora_jax.lora import LoraFactors, apply_masks
from fedlora_jax.models import export_peft, import_peft, split_for_round

SCALE = 0.75
R = 4


def _adapter(name, modules=None, layers=None, seed=0):
    model = load_golden_model(name)
    tree, targets = random_lora(model, jax.random.key(seed), r_max=R, modules=modules,
                                layers=layers)
    tree = nonzero_b(tree, jax.random.key(seed + 1))
    masks = {k: jnp.array([1.0, 0.0, 1.0, 1.0]) if i % 2 else jnp.ones(R)
             for i, k in enumerate(sorted(tree))}
    return model, apply_masks(tree, masks), masks, targets


@pytest.mark.parametrize("name,task", [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"),
                                       ("qwen2", "CAUSAL_LM")])
def test_round_trip_identical(tmp_path, name, task):
    model, tree, masks, targets = _adapter(name)
    out = export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path / "ad",
                      base_model_name_or_path=str(GOLDENS / name), task_type=task,
                      head=split_for_round(model)[2])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == pytest.approx(SCALE * R)
    assert cfg["fan_in_fan_out"] == (name == "gpt2")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    k0 = sorted(tree)[0]
    a_key = f"base_model.model.{targets[k0].hf_path}.lora_A.weight"
    np.testing.assert_array_equal(tensors[a_key], np.asarray(tree[k0].a).T)   # [R, N]
    lora2, masks2, scale2 = import_peft(out, targets=targets)
    assert scale2 == pytest.approx(SCALE) and set(lora2) == set(tree)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(lora2[k].a), np.asarray(tree[k].a))
        np.testing.assert_array_equal(np.asarray(lora2[k].b), np.asarray(tree[k].b))
        np.testing.assert_array_equal(np.asarray(masks2[k]), np.asarray(masks[k]))
    assert not list(out.glob("*.tmp"))   # atomic writes leave no temp files


def test_gain_folded_and_import_pads_to_r_max(tmp_path):
    _, tree, masks, targets = _adapter("llama", modules=["q_proj"])
    e = jnp.array([2.0, 5.0, 0.5, 1.0])
    tree_e = {k: f._replace(e=e) for k, f in tree.items()}
    export_peft(tree_e, masks, scale=SCALE, targets=targets, out_dir=tmp_path,
                base_model_name_or_path="x", task_type="CAUSAL_LM")
    lora2, masks2, _ = import_peft(tmp_path, r_max=6)
    for k, f in tree_e.items():
        g = np.asarray(masks[k] * e)
        ref = np.asarray(f.a) @ np.diag(g) @ np.asarray(f.b)
        got = np.asarray(lora2[k].a) @ np.diag(np.asarray(masks2[k])) @ np.asarray(lora2[k].b)
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert lora2[k].a.shape[-1] == 6 and float(masks2[k][4:].sum()) == 0


def test_import_errors(tmp_path):
    _, tree, masks, targets = _adapter("llama", modules=["v_proj"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(tmp_path / "none")
    d = export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path / "ok",
                    base_model_name_or_path="x", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"ranks exceed r_max=2"):
        import_peft(d, r_max=2)
    other = load_golden_model("gpt2").adapter_targets()
    with pytest.raises(ValueError, match="not a target of the model"):
        import_peft(d, targets=other)
    t = load_file(str(d / "adapter_model.safetensors"))
    k = next(iter(t))
    bad = dict(t)
    bad[k.replace("v_proj", "w_proj")] = bad.pop(k)
    save_file(bad, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unknown target module.*w_proj"):
        import_peft(d)
    bad = dict(t)
    ka = next(x for x in t if "lora_A" in x)
    bad[ka] = bad[ka][:, :-1].copy()
    save_file(bad, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter is \\[31, 16\\], model kernel is \\[32, 16\\]"):
        import_peft(d, targets=targets)
    bad[ka] = bad[ka][:-1].copy()
    save_file(bad, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        import_peft(d)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="never|not read"):
        import_peft(d)


def test_export_errors(tmp_path):
    _, tree, masks, targets = _adapter("gpt2", modules=["c_attn"])
    k = sorted(tree)[0]
    wrong = dict(tree)
    wrong[k] = LoraFactors(tree[k].a[:-1], tree[k].b)
    with pytest.raises(ValueError, match="do not fit target"):
        export_peft(wrong, masks, scale=1.0, targets=targets, out_dir=tmp_path,
                    base_model_name_or_path="x", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_type"):
        export_peft(tree, masks, scale=1.0, targets=targets, out_dir=tmp_path,
                    base_model_name_or_path="x", task_type="LM")
    with pytest.raises(ValueError, match="needs head="):
        export_peft(tree, masks, scale=1.0, targets=targets, out_dir=tmp_path,
                    base_model_name_or_path="x", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="not in targets"):
        export_peft(tree, masks, scale=1.0, targets={}, out_dir=tmp_path,
                    base_model_name_or_path="x", task_type="CAUSAL_LM")


@pytest.mark.interop
@pytest.mark.parametrize("name,task,cls", [
    ("bert", "SEQ_CLS", "BertForSequenceClassification"),
    ("gpt2", "CAUSAL_LM", "GPT2LMHeadModel"),
    ("llama", "CAUSAL_LM", "LlamaForCausalLM"),
])
def test_peft_loads_our_adapter(tmp_path, name, task, cls):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    model, tree, masks, targets = _adapter(name, seed=3)
    ids, mask = inputs(name)
    ours = np.asarray(model(ids, mask, lora=tree, masks=masks, scale=SCALE))
    export_peft(tree, masks, scale=SCALE, targets=targets, out_dir=tmp_path,
                base_model_name_or_path=str(GOLDENS / name), task_type=task,
                head=split_for_round(model)[2])
    base = getattr(transformers, cls).from_pretrained(str(GOLDENS / name), local_files_only=True)
    pm = peft.PeftModel.from_pretrained(base.eval(), str(tmp_path)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
        merged = pm.merge_and_unload()(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                                       attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    plain = np.asarray(model(ids, mask))
    assert np.abs(ours - plain).max() > 1e-4   # the adapter changes the outputs
    np.testing.assert_allclose(ref, ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=1e-4)
