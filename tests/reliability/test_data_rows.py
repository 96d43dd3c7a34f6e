"""Bad rows in a dataset file are refused by the loader, with file, column, rows and count named (issue 18).

Each case writes a real small file to ``tmp_path`` and loads it through
``load_text_classification`` (or ``load_hf_split``). The error must name the file, the column,
how many rows, the 1-based data rows and, for csv/tsv/jsonl, the file lines; nothing is
returned for a file with a bad row.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora_jax.data import load_hf_split, load_text_classification

pytestmark = pytest.mark.filterwarnings("ignore")

CSV_WHERE = "1-based, header not counted"


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf_cache")


def _load(path, hf_cache, **kw):
    return load_text_classification(path, split=kw.pop("split", "train"), cache_dir=hf_cache, **kw)


def _error(path, hf_cache, **kw) -> str:
    with pytest.raises(ValueError) as info:
        _load(path, hf_cache, **kw)
    return str(info.value)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ the issue: no label, no text


def test_issue_row_without_label_and_row_without_text(tmp_path, hf_cache):
    # Before: the label column was read as strings ('0', '1', '') and '' became a third class.
    p = _write(tmp_path / "train.csv", "text,label\ngood,1\nmeh,\n,0\nbad,0\n")
    msg = _error(p, hf_cache)
    assert f"{p}: column 'label': 1 row has no label (data row 2, {CSV_WHERE}; file line 3)" in msg
    assert f"{p}: column 'text': 1 row has an empty text (data row 3, {CSV_WHERE}; file line 4" in msg
    assert len(msg.splitlines()) == 2  # both problems in one error
    # Through a folder too: the file is still named.
    assert f"{p}: column 'label'" in _error(tmp_path, hf_cache)


# ------------------------------------------------------------------ texts


def test_missing_text_jsonl(tmp_path, hf_cache):
    p = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": null, "label": 0}\n{"label": 1}\n'
                                     '{"text": "b", "label": 0}\n')
    msg = _error(p, hf_cache)
    assert f"{p}: column 'text': 2 rows have no text (data rows 2, 3, 1-based; file lines 3, 4)" == msg


def test_empty_text_csv(tmp_path, hf_cache):
    p = _write(tmp_path / "d.csv", 'text,label\na,1\n"",0\nb,1\n"   ",0\n')
    msg = _error(p, hf_cache)
    assert msg.startswith(f"{p}: column 'text': 2 rows have an empty text (data rows 2, 4, {CSV_WHERE}; "
                          "file lines 3, 5; values '', '   ')")


def test_empty_text_custom_column_tsv(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "body\ty\nx\t0\n\t1\n")
    msg = _error(p, hf_cache, text_column="body", label_column="y")
    assert f"{p}: column 'body': 1 row has an empty text (data row 2, {CSV_WHERE}; file line 3)" in msg


# ------------------------------------------------------------------ labels


def test_missing_label_tsv(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "sentence\tlabel\na\t1\nb\t\nc\t0\nd\tnan\ne\tNULL\n")
    msg = _error(p, hf_cache)
    assert msg == (f"{p}: column 'label': 3 rows have no label (data rows 2, 4, 5, {CSV_WHERE}; "
                   "file lines 3, 5, 6; values '', 'nan', 'NULL')")


def test_missing_label_jsonl_null_nan_and_absent(tmp_path, hf_cache):
    # String labels mixed with NaN (Python's json writes NaN), null, and a row without the key.
    p = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": float("nan")},
            {"text": "c", "label": None}, {"text": "d"}, {"text": "e", "label": "neg"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _error(p, hf_cache)
    assert msg == f"{p}: column 'label': 3 rows have no label (data rows 2, 3, 4, 1-based; file lines 2, 3, 4)"


def test_unparseable_integer_labels_tsv(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "text\tlabel\na\t1\nb\tpositive\nc\t3.5\nd\t0\ne\t1\n")
    msg = _error(p, hf_cache)
    assert msg == (f"{p}: column 'label': 2 rows have a label that is not an integer (data rows 2, 3, {CSV_WHERE}; "
                   "file lines 3, 4; values 'positive', '3.5'); the column's other 3 labels are integers")


def test_float_label_jsonl(tmp_path, hf_cache):
    p = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 3.5}\n'
                                     '{"text": "c", "label": 0}\n')
    msg = _error(p, hf_cache)
    assert f"{p}: column 'label': 1 row has a label that is not an integer (data row 2, 1-based; file line 2; " \
           "value 3.5)" in msg


def test_number_among_word_labels_csv(tmp_path, hf_cache):
    p = _write(tmp_path / "d.csv", "text,label\na,World\nb,3\nc,Sports\nd,Sports\n")
    msg = _error(p, hf_cache)
    assert msg == (f"{p}: column 'label': 1 row has a numeric label (data row 2, {CSV_WHERE}; file line 3; "
                   "value '3'); the column's other 3 labels are words")


def test_negative_label(tmp_path, hf_cache):
    p = _write(tmp_path / "test.tsv", "text\tlabel\na\t-1\nb\t-1\n")
    msg = _error(p, hf_cache, split="test")
    assert f"{p}: column 'label': 2 rows have a negative label (data rows 1, 2" in msg
    assert "unlabelled test split" in msg


def test_bad_label_in_a_large_file(tmp_path, hf_cache):
    # Over one pandas chunk (10k rows): datasets used to fail with "Failed to parse string ... int64".
    body = "".join(f"t{i}\t{i % 2}\n" for i in range(12_000))
    p = _write(tmp_path / "train.tsv", "sentence\tlabel\n" + body + "x\tpositive\n")
    msg = _error(p, hf_cache)
    assert msg == (f"{p}: column 'label': 1 row has a label that is not an integer (data row 12001, {CSV_WHERE}; "
                   "file line 12002; value 'positive'); the column's other 12000 labels are integers")


def test_many_bad_rows_are_counted_and_elided(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"t{i}\t\n" for i in range(40)) + "ok\t1\n")
    msg = _error(p, hf_cache)
    assert msg == (f"{p}: column 'label': 40 rows have no label (data rows 1, 2, 3, 4, 5 and 35 more, {CSV_WHERE}; "
                   "file lines 2, 3, 4, 5, 6 and 35 more)")


def test_bad_row_beyond_max_examples_still_refused(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "text\tlabel\na\t1\nb\t0\nc\t\n")
    assert "1 row has no label (data row 3" in _error(p, hf_cache, max_examples=2)


# ------------------------------------------------------------------ train / test label sets


def test_unseen_string_label_in_test_split(tmp_path, hf_cache):
    _write(tmp_path / "train.tsv", "text\tlabel\na\tWorld\nb\tSports\n")
    test = _write(tmp_path / "test.tsv", "text\tlabel\nc\tWorld\nd\tHealth\ne\tHealth\n")
    train = _load(tmp_path, hf_cache)
    msg = _error(tmp_path, hf_cache, split="test", label_names=train.label_names)
    assert msg == (f"{test}: column 'label': 2 rows have the label 'Health' (data rows 2, 3, {CSV_WHERE}; "
                   "file lines 3, 4), which is not in label_names ['Sports', 'World'] "
                   "(for a test split: a label the training split does not have)")


def test_unseen_integer_label_in_test_split(tmp_path, hf_cache):
    _write(tmp_path / "train.csv", "text,label\na,0\nb,1\n")
    test = _write(tmp_path / "test.csv", "text,label\nc,1\nd,2\n")
    train = _load(tmp_path, hf_cache)
    msg = _error(tmp_path, hf_cache, split="test", label_names=train.label_names)
    assert f"{test}: column 'label': 1 row has the label 2 (data row 2, {CSV_WHERE}; file line 3), out of range " \
           "for the 2 label_names ['0', '1'] (class ids 0..1)" in msg


def test_class_label_ids_map_by_name(tmp_path, hf_cache):
    import datasets

    def part(names, labels, split):
        d = datasets.Dataset.from_dict(
            {"sentence": [f"s{i}" for i in range(len(labels))], "label": labels},
            features=datasets.Features({"sentence": datasets.Value("string"),
                                        "label": datasets.ClassLabel(names=names)}))
        d.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))

    (tmp_path / "repo" / "data").mkdir(parents=True)
    part(["x", "y"], [0, 1], "train")
    part(["y", "x"], [0, 0, 1], "test")  # same classes, other order: ids mean other names
    train = _load(tmp_path / "repo", hf_cache)
    test = _load(tmp_path / "repo", hf_cache, split="test", label_names=train.label_names)
    assert test.label_names == ["x", "y"] and test.labels.tolist() == [1, 1, 0]
    part(["x", "z"], [1], "test")
    msg = _error(tmp_path / "repo", hf_cache, split="test", label_names=train.label_names)
    assert "test-00000-of-00001.parquet: column 'label': 1 row has the label 'z' (data row 1, 1-based)" in msg
    part(["x", "y"], [0, -1], "test")  # ClassLabel -1: no label
    msg = _error(tmp_path / "repo", hf_cache, split="test", label_names=train.label_names)
    assert "column 'label': 1 row has no label (data row 2, 1-based" in msg


# ------------------------------------------------------------------ columns and delimiters


def test_duplicate_column(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "text\tlabel\tlabel\na\t1\t2\n")
    msg = _error(p, hf_cache)
    assert msg == f"{p}: duplicate column names in the header: 'label' (columns 2, 3); column names must be unique"
    with pytest.raises(ValueError, match="duplicate column names"):  # any loader of the file
        load_hf_split(p, split="train", cache_dir=hf_cache)


def test_missing_column_names_file_and_columns(tmp_path, hf_cache):
    p = _write(tmp_path / "d.csv", "text,target\na,1\n")
    assert _error(p, hf_cache) == f"{p}: label column 'label' not found; available columns: ['text', 'target']"
    msg = _error(p, hf_cache, text_column="sentence", label_column="target")
    assert msg == f"{p}: text column 'sentence' not found; available columns: ['text', 'target']"
    j = _write(tmp_path / "d.jsonl", '{"body": "a", "label": 0}\n')
    msg = _error(j, hf_cache)
    assert msg.startswith(f"{j}: no text column found among ['sentence', 'text', 'content']; available columns: "
                          "['body', 'label']")


def test_tsv_that_is_comma_separated(tmp_path, hf_cache):
    p = _write(tmp_path / "train.tsv", "text,label\na,1\nb,0\n")
    msg = _error(p, hf_cache)
    assert msg.startswith(f"{p}: ")
    assert "available columns: ['text,label']" in msg
    assert ("split by comma (',') the header has the columns ['text', 'label']: the file looks comma-separated, "
            "rename it to .csv (.tsv files are read tab-separated)") in msg
    with pytest.raises(ValueError, match=r"the header 'text,label' is a single column; split by comma"):
        load_hf_split(p, split="train", cache_dir=hf_cache)


def test_csv_that_is_tab_or_semicolon_separated(tmp_path, hf_cache):
    p = _write(tmp_path / "a.csv", "text\tlabel\na\t1\n")
    assert "split by tab ('\\t') the header has the columns ['text', 'label']" in _error(p, hf_cache)
    assert "rename it to .tsv" in _error(p, hf_cache)
    q = _write(tmp_path / "b.csv", "text;label\na;1\n")
    msg = _error(q, hf_cache)
    assert "split by semicolon (';') the header has the columns ['text', 'label']" in msg
    assert "save it comma-separated (.csv) or tab-separated (.tsv)" in msg


def test_rows_with_the_wrong_number_of_fields(tmp_path, hf_cache):
    p = _write(tmp_path / "d.tsv", "text\tlabel\na\tb\t1\nno tab here\nc\t0\n")
    msg = _error(p, hf_cache)
    assert msg.splitlines() == [
        f"{p}: 1 row has 3 fields (data row 1, {CSV_WHERE}; file line 2) but the header has 2 columns "
        "['text', 'label'] (a tab inside a text? .tsv fields are not quoted)",
        f"{p}: 1 row has 1 field (data row 2, {CSV_WHERE}; file line 3) but the header has 2 columns "
        "['text', 'label']",
    ]


def test_empty_file(tmp_path, hf_cache):
    p = _write(tmp_path / "d.csv", "\n")
    assert _error(p, hf_cache) == f"{p}: the file is empty (no header line)"


# ------------------------------------------------------------------ where rows are counted


def test_multi_file_split_names_the_file_and_its_own_rows(tmp_path, hf_cache):
    (tmp_path / "train").mkdir()
    _write(tmp_path / "train" / "a.csv", "text,label\nx,1\ny,0\n")
    b = _write(tmp_path / "train" / "b.csv", 'text,label\n"two\nlines",1\nz,\n')
    msg = _error(tmp_path, hf_cache)
    assert msg == f"{b}: column 'label': 1 row has no label (data row 2, {CSV_WHERE}; file line 4)"


def test_blank_lines_and_quoted_newlines_keep_line_numbers(tmp_path, hf_cache):
    p = _write(tmp_path / "d.csv", 'text,label\n\n"multi\nline",1\n\nb,\n')
    assert _error(p, hf_cache) == f"{p}: column 'label': 1 row has no label (data row 2, {CSV_WHERE}; file line 6)"


def test_valid_files_still_load(tmp_path, hf_cache):
    # Texts that look like missing values are texts; integer labels stay integer ids.
    p = _write(tmp_path / "d.tsv", "text\tlabel\nNA\t2\nnull\t0\nNaN\t1\n")
    ds = _load(p, hf_cache)
    assert ds.texts == ["NA", "null", "NaN"] and ds.labels.tolist() == [2, 0, 1]
    assert ds.label_names == ["0", "1", "2"] and ds.labels.dtype == np.int32
    j = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n')
    assert _load(j, hf_cache).labels.tolist() == [1, 0]  # integral floats are class ids


def test_json_array_and_save_to_disk_name_rows(tmp_path, hf_cache):
    import datasets

    p = _write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "x"}, {"text": "", "label": "y"}]))
    assert _error(p, hf_cache) == f"{p}: column 'text': 1 row has an empty text (data row 2, 1-based)"
    d = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, None, 1]})
    datasets.DatasetDict({"train": d}).save_to_disk(str(tmp_path / "saved"))
    msg = _error(tmp_path / "saved", hf_cache)
    assert msg == f"{tmp_path / 'saved'} (split 'train'): column 'label': 1 row has no label (data row 2, 1-based)"


def test_delimiter_hint_when_columns_appear_with_another_delimiter(tmp_path, hf_cache):
    # Several columns with the file's own delimiter, yet the wanted ones only appear with ';'.
    p = _write(tmp_path / "d.csv", "text;label;notes, misc\na;1;x\n")
    msg = _error(p, hf_cache)
    assert "available columns: ['text;label;notes', ' misc']" in msg
    assert "split by semicolon (';') the header has the columns ['text', 'label', 'notes, misc']" in msg
    # No hint when no other delimiter finds the columns.
    q = _write(tmp_path / "e.tsv", "id\ttitle, abstract\tlabel\n1\tx\t0\n")
    assert _error(q, hf_cache).endswith("available columns: ['id', 'title, abstract', 'label']; pass text_column=")


def test_not_utf8(tmp_path, hf_cache):
    p = tmp_path / "d.tsv"
    p.write_bytes("text\tlabel\ncaf\u00e9\t1\n".encode("latin-1"))
    assert _error(p, hf_cache).startswith(f"{p}: not UTF-8 text (")
