"""Loading: the offline SST-2 / AG News files, local file formats, columns, labels, errors."""

import csv
import json

import numpy as np
import pytest

from fedlora_jax.data import (
    CausalLMDataset,
    encode_labels,
    load_causal_lm,
    load_text_classification,
    resolve_source,
    shared_data_dir,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def _has_shared_data():
    try:
        return (shared_data_dir() / "sst2" / "test.tsv").is_file()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _has_shared_data(), reason="../shared/data not present")


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf_cache")


@needs_data
def test_sst2_test_split(hf_cache):
    ds = load_text_classification("sst2", split="test", cache_dir=hf_cache)
    assert len(ds.texts) == 872
    assert ds.labels.shape == (872,) and ds.labels.dtype == np.int32
    assert ds.label_names == ["0", "1"]
    assert sorted(np.bincount(ds.labels).tolist()) == [428, 444]
    assert all(isinstance(t, str) and t for t in ds.texts)


@needs_data
def test_agnews_train_split(hf_cache):
    ds = load_text_classification("agnews", split="train", cache_dir=hf_cache)
    assert len(ds.texts) == 10_001
    assert ds.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    counts = np.bincount(ds.labels, minlength=4)
    assert counts.sum() == 10_001 and counts.min() > 2000
    # Compare with a plain csv read (quoting off: texts keep their literal quotes).
    with open(shared_data_dir() / "agnews" / "train.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert [r[0] for r in rows[:50]] == ds.texts[:50]
    assert [ds.label_names[i] for i in ds.labels[:50]] == [r[1] for r in rows[:50]]
    assert any('"' in t for t in ds.texts)


@needs_data
def test_named_source_and_env(monkeypatch, tmp_path, hf_cache):
    folder = tmp_path / "mydata" / "sst2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path / "mydata"))
    assert shared_data_dir() == (tmp_path / "mydata").resolve()
    ds = load_text_classification("sst2", split="validation", cache_dir=hf_cache)  # alias
    assert ds.texts == ["good", "bad"] and ds.labels.tolist() == [1, 0]


def test_local_formats(tmp_path, hf_cache):
    rows = [("it is NA", "pos"), ('say "hi"', "neg"), ("null", "pos")]
    (tmp_path / "train.tsv").write_text(
        "text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows)
    )
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["content", "label"])
        w.writerows(rows)
    with open(tmp_path / "d.jsonl", "w") as f:
        for t, lab in rows:
            f.write(json.dumps({"content": t, "label": lab}) + "\n")
    expected_texts = [t for t, _ in rows]
    for src in (tmp_path, tmp_path / "train.tsv", tmp_path / "d.csv", tmp_path / "d.jsonl"):
        ds = load_text_classification(src, split="train", cache_dir=hf_cache)
        assert ds.texts == expected_texts, src
        assert ds.label_names == ["neg", "pos"]
        assert ds.labels.tolist() == [1, 0, 1]


def test_parquet_and_save_to_disk(tmp_path, hf_cache):
    import datasets

    d = datasets.Dataset.from_dict(
        {"sentence": ["a", "b", "c"], "label": [2, 0, 1]},
        features=datasets.Features(
            {"sentence": datasets.Value("string"),
             "label": datasets.ClassLabel(names=["x", "y", "z"])}
        ),
    )
    (tmp_path / "repo" / "data").mkdir(parents=True)
    d.to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    ds = load_text_classification(tmp_path / "repo", split="test", cache_dir=hf_cache)
    assert ds.texts == ["a", "b", "c"] and ds.labels.tolist() == [2, 0, 1]
    datasets.DatasetDict({"train": d}).save_to_disk(str(tmp_path / "saved"))
    ds = load_text_classification(tmp_path / "saved", split="train")
    assert ds.label_names == ["x", "y", "z"] and ds.labels.tolist() == [2, 0, 1]


def test_label_names_and_max_examples(tmp_path, hf_cache):
    (tmp_path / "train.tsv").write_text("text\tlabel\na\tWorld\nb\tSports\nc\tWorld\n")
    ds = load_text_classification(
        tmp_path, split="train", label_names=["World", "Sports"], max_examples=2,
        cache_dir=hf_cache,
    )
    assert ds.texts == ["a", "b"] and ds.labels.tolist() == [0, 1]
    sub = ds.select([1])
    assert sub.texts == ["b"] and sub.labels.tolist() == [1]


def test_encode_labels():
    labels, names = encode_labels(["b", "a", "c", "a"])
    assert names == ["a", "b", "c"] and labels.tolist() == [1, 0, 2, 0]
    labels, names = encode_labels([3, 0, 1])
    assert names == ["0", "1", "2", "3"] and labels.dtype == np.int32
    with pytest.raises(ValueError, match="not in label_names"):
        encode_labels(["a", "d"], label_names=["a", "b"])
    with pytest.raises(ValueError, match=">= 0"):
        encode_labels([0, -1])
    with pytest.raises(ValueError, match="out of range"):
        encode_labels([0, 2], label_names=["a", "b"])
    with pytest.raises(ValueError, match="all strings or all integers"):
        encode_labels([0, "a"])


def test_missing_columns_name_available(tmp_path, hf_cache):
    (tmp_path / "train.tsv").write_text("body\tcls\nx\t0\n")
    with pytest.raises(ValueError, match=r"available columns: \['body', 'cls'\]"):
        load_text_classification(tmp_path, split="train", cache_dir=hf_cache)
    with pytest.raises(ValueError, match="label column 'label'.*'body', 'cls'"):
        load_text_classification(tmp_path, split="train", text_column="body", cache_dir=hf_cache)
    with pytest.raises(ValueError, match="text column 'nope'"):
        load_text_classification(
            tmp_path, split="train", text_column="nope", label_column="cls", cache_dir=hf_cache
        )
    ds = load_text_classification(
        tmp_path, split="train", text_column="body", label_column="cls", cache_dir=hf_cache
    )
    assert ds.texts == ["x"]


def test_missing_source_and_split(tmp_path, hf_cache):
    with pytest.raises(FileNotFoundError, match="not an existing path"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "train.tsv").write_text("text\tlabel\nx\t0\n")
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        load_text_classification(tmp_path, split="test", cache_dir=hf_cache)


def test_load_causal_lm(tmp_path, hf_cache):
    path = tmp_path / "instr.jsonl"
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_causal_lm(path, cache_dir=hf_cache)
    assert isinstance(ds, CausalLMDataset) and len(ds.texts) == 2
    assert ds.prompts[0] == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert ds.texts[0] == ds.prompts[0] + "5"
    assert "### Input:\nchat" in ds.prompts[1] and ds.texts[1].endswith("cat")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "hello"}\n{"text": "world"}\n')
    ds = load_causal_lm(plain, cache_dir=hf_cache)
    assert ds.texts == ["hello", "world"] and ds.prompts is None
    with pytest.raises(ValueError, match="available columns"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"q": "x"}\n')
        load_causal_lm(bad, cache_dir=hf_cache)
