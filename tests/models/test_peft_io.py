"""PEFT adapter export/import: round trip, bad files, peft loading our adapter, PEFT target-module
names, the encoder pooler and the SEQ_CLS classifier head."""

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
from fedlora_jax.models.peft_io import PEFT_TARGET_NAMES, import_peft_head, model_targets, peft_targets

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


# ------------------------------------------------------------------ PEFT target names, pooler, head

_EXPECTED_MODULES = {   # PEFT name -> our modules it selects (the golden encoders pool with the pooler)
    "bert": {"query": {"query"}, "key": {"key"}, "value": {"value"},
             "dense": {"attn_out", "ffn_in", "ffn_out", "pooler"}},
    "gpt2": {"c_attn": {"c_attn"}, "c_proj": {"attn_proj", "mlp_proj"}, "c_fc": {"mlp_fc"}},
    "llama": {m: {m} for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
}
_EXPECTED_MODULES["roberta"] = _EXPECTED_MODULES["bert"]
_EXPECTED_MODULES["qwen2"] = _EXPECTED_MODULES["llama"]
_FAMILY = {"bert": "BERT/RoBERTa", "roberta": "BERT/RoBERTa", "gpt2": "GPT-2", "llama": "Llama/Qwen2",
           "qwen2": "Llama/Qwen2"}


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama", "qwen2"])
def test_peft_target_names_per_family(name):
    model = load_golden_model(name)
    n_layers = model.config.num_layers
    expected = _EXPECTED_MODULES[name]
    assert set(PEFT_TARGET_NAMES[_FAMILY[name]]) == set(expected) | {"all-linear"}
    everything = model_targets(model)
    for peft_name, modules in expected.items():
        got = peft_targets(model, [peft_name])
        assert {t.module for t in got.values()} == modules, peft_name
        assert set(got) <= set(everything)
    assert peft_targets(model, "all-linear") == everything == peft_targets(model, ["all-linear"])
    if name in ("bert", "roberta"):   # the pooler: key layer.{L}.pooler, HF pooler.dense
        pooler = everything[f"layer.{n_layers}.pooler"]
        assert pooler == model.pooler_targets()[f"layer.{n_layers}.pooler"]
        assert pooler.hf_path == f"{name}.pooler.dense" and pooler.layer == n_layers
        assert f"layer.{n_layers}.pooler" not in model.adapter_targets()   # opt-in: round keys unchanged
    union = peft_targets(model, list(expected))
    assert set(union) == set(everything)
    regex = peft_targets(model, r".*\.(query|q_proj|c_attn)")
    assert {t.module for t in regex.values()} == {next(iter(expected))}
    with pytest.raises(ValueError, match=r"target module 'lm_head' is not supported.*supported names: \[") as err:
        peft_targets(model, ["lm_head"])
    for supported in expected:
        assert repr(supported) in str(err.value)
    with pytest.raises(ValueError, match="matches no adapter target"):
        peft_targets(model, "query")   # a string is a full-path regex, as in PEFT


def test_pooler_needs_pooler_pooling(tmp_path):
    model = load_golden_model("bert", pooling="mean")
    with pytest.raises(ValueError, match="only with pooling='pooler'.*pools with 'mean'"):
        model.pooler_targets()
    got = peft_targets(model, ["dense"])   # the block denses only: the model has no pooler
    assert {t.module for t in got.values()} == {"attn_out", "ffn_in", "ffn_out"}
    with pytest.raises(ValueError, match="pooler.*pooling='pooler'"):
        peft_targets(model, ["pooler.dense"])
    pooled = load_golden_model("bert")
    targets = peft_targets(pooled, ["query", "dense"])
    tree, _ = random_lora(pooled, jax.random.key(0), r_max=R, modules=["query"])
    key = f"layer.{pooled.config.num_layers}.pooler"
    t = targets[key]
    tree[key] = LoraFactors(0.3 * jax.random.normal(jax.random.key(1), (t.in_features, R)),
                            0.3 * jax.random.normal(jax.random.key(2), (R, t.out_features)), None)
    ids, mask = inputs("bert")
    with pytest.raises(ValueError, match="not adapter targets"):
        model(ids, mask, lora=tree, scale=SCALE)
    d = export_peft(tree, None, scale=SCALE, targets=targets, out_dir=tmp_path / "ad",
                    base_model_name_or_path="x", task_type="SEQ_CLS", head=split_for_round(pooled)[2])
    assert "base_model.model.bert.pooler.dense.lora_A.weight" in load_file(str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="'bert.pooler.dense' adapts the encoder pooler.*pooling='pooler'"):
        import_peft(d, model=model)
    with pytest.raises(ValueError, match="adapts the encoder pooler.*pass model="):
        import_peft(d)
    with pytest.raises(ValueError, match="targets hold no pooler"):
        import_peft(d, targets=pooled.adapter_targets())
    with pytest.raises(ValueError, match="not both"):
        import_peft(d, model=pooled, targets=targets)
    lora2, masks2, _ = import_peft(d, model=pooled)
    assert set(lora2) == set(tree)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(lora2[k].a), np.asarray(tree[k].a))
        np.testing.assert_array_equal(np.asarray(lora2[k].b), np.asarray(tree[k].b))
    # The pooler adapter is applied in the forward pass: drop it and the logits change.
    full = np.asarray(pooled(ids, mask, lora=lora2, masks=masks2, scale=SCALE))
    no_pooler = {k: v for k, v in lora2.items() if k != key}
    assert np.abs(full - np.asarray(pooled(ids, mask, lora=no_pooler, scale=SCALE))).max() > 1e-4


def test_head_export_import(tmp_path):
    model = load_golden_model("bert")
    graphdef, base, head = split_for_round(model)
    tree, targets = random_lora(model, jax.random.key(0), r_max=R, modules=["value"])
    pure = head.to_pure_dict()["head"]
    trained = {"classifier": {"kernel": pure["classifier"]["kernel"] + 1.5, "bias": pure["classifier"]["bias"] - 2.0}}
    d = export_peft(tree, None, scale=SCALE, targets=targets, out_dir=tmp_path / "ad",
                    base_model_name_or_path="x", task_type="SEQ_CLS", head=trained)
    as_dict = import_peft_head(d)
    for part in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(as_dict["classifier"][part]), np.asarray(trained["classifier"][part]))
    new_head = import_peft_head(d, head)
    np.testing.assert_array_equal(np.asarray(new_head.to_pure_dict()["head"]["classifier"]["kernel"]),
                                  np.asarray(trained["classifier"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(head.to_pure_dict()["head"]["classifier"]["kernel"]),
                                  np.asarray(pure["classifier"]["kernel"]))   # the input head is untouched
    ids, mask = inputs("bert")
    from fedlora_jax.models import functional_forward
    got = functional_forward(graphdef, base, new_head, ids, mask, lora=tree, masks=None, scale=SCALE)
    pooled = model.pool(model.encode(ids, mask, lora=tree, scale=SCALE), mask)
    ref = pooled @ trained["classifier"]["kernel"] + trained["classifier"]["bias"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    in_dict = import_peft_head(d, {"head": trained})
    assert set(in_dict) == {"head"} and in_dict["head"]["classifier"]["bias"].shape == (3,)
    # The head module itself, as a user passes it (model.head): updated in place and returned.
    from flax import nnx
    assert import_peft_head(d, model.head) is model.head
    for part in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(nnx.to_pure_dict(nnx.state(model.head))["classifier"][part]),
                                      np.asarray(trained["classifier"][part]))
    with pytest.raises(TypeError, match=r"head must be None, the head module \(model.head\)"):
        import_peft_head(d, [model.head])
    five = load_golden_model("bert", num_labels=5)
    with pytest.raises(ValueError, match=r"saved classifier is \[D=32, K=3\].*num_labels=3"):
        import_peft_head(d, split_for_round(five)[2])
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.classifier.out_proj.weight"] = t.pop("base_model.model.classifier.weight")
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"modules_to_save module\(s\) \['classifier.out_proj'\] are not supported"):
        import_peft_head(d)
    _, ltree, lmasks, ltargets = _adapter("llama", modules=["q_proj"])
    d2 = export_peft(ltree, lmasks, scale=SCALE, targets=ltargets, out_dir=tmp_path / "lm",
                     base_model_name_or_path="x", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="holds no saved 'classifier'"):
        import_peft_head(d2)


@pytest.mark.interop
@pytest.mark.parametrize("name,cls,task", [
    ("bert", "BertForSequenceClassification", "SEQ_CLS"),
    ("roberta", "RobertaModel", "FEATURE_EXTRACTION"),
    ("gpt2", "GPT2LMHeadModel", "CAUSAL_LM"),
    ("llama", "LlamaForCausalLM", "CAUSAL_LM"),
    ("qwen2", "Qwen2ForCausalLM", "CAUSAL_LM"),
])
def test_peft_targets_select_what_peft_adapts(name, cls, task):
    """Every supported name (and all-linear) selects exactly the modules peft wraps."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    model = load_golden_model(name)
    names = [[n] for n in _EXPECTED_MODULES[name]] + [list(_EXPECTED_MODULES[name]), "all-linear"]
    for target_modules in names:
        base = getattr(transformers, cls).from_pretrained(str(GOLDENS / name), local_files_only=True)
        pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=target_modules, task_type=task))
        wrapped = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                   if hasattr(mod, "lora_A") and ".modules_to_save." not in n}
        ours = {t.hf_path for t in peft_targets(model, target_modules).values()}
        strip = (lambda p: p.removeprefix(f"{name}.")) if task == "FEATURE_EXTRACTION" else (lambda p: p)
        assert {strip(p) for p in ours} == wrapped, target_modules


@pytest.mark.interop
def test_unsupported_peft_module_refused_on_import(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(str(GOLDENS / "llama"), local_files_only=True)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown target module 'lm_head'; supported target modules are "
                                         r"BERT/RoBERTa: query, key, value, dense, all-linear; GPT-2: c_attn"):
        import_peft(tmp_path)
