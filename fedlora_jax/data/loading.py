"""Loading labelled text and causal-LM text from local files, folders and ``datasets`` dirs.

Everything here is offline: sources are local paths (a file, a folder of split files, a
``datasets.save_to_disk`` folder or a Hub-format dataset repository already on disk), or the
named shortcuts ``"sst2"`` / ``"agnews"`` that resolve inside :func:`shared_data_dir`.
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` are set in-process (unless the user set
them) before ``datasets`` is imported, so no code path reaches for the network.

:func:`load_text_classification` checks every row of the split before it returns (csv/tsv
files before ``datasets`` reads them): duplicate or missing columns, a csv/tsv delimiter that
does not fit the file, rows with the wrong number of fields, missing or empty texts, missing
labels, labels that are not of the column's type, and labels outside ``label_names``. One
``ValueError`` lists every problem, one line each, naming the file, the column, the row count,
the first rows (1-based data rows, header not counted; file lines for csv/tsv/jsonl) and values.

Example:
    >>> ds = load_text_classification("sst2", split="test")      # doctest: +SKIP
    >>> len(ds.texts), ds.labels.shape, ds.label_names            # doctest: +SKIP
    (872, (872,), ['0', '1'])
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATA_DIR_ENV = "FEDLORA_DATA_DIR"

#: Named offline datasets: name -> (folder under :func:`shared_data_dir`, text column).
NAMED_DATASETS: dict[str, tuple[str, str]] = {
    "sst2": ("sst2", "sentence"),
    "agnews": ("agnews", "text"),
}

TEXT_COLUMN_CANDIDATES = ("sentence", "text", "content")
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "validation": ("dev", "valid", "val"),
    "dev": ("validation", "valid", "val"),
    "valid": ("validation", "dev", "val"),
    "val": ("validation", "dev", "valid"),
}
_FILE_BUILDERS = {
    ".tsv": "csv",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_SPLIT_FILE_EXTS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class TextDataset(NamedTuple):
    """Labelled texts, ``E`` examples.

    Attributes:
      texts: ``E`` strings.
      labels: ``[E]`` int32 class ids in ``[0, len(label_names))``.
      label_names: class names; ``label_names[i]`` is the name of class ``i``.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def select(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at ``indices`` (same label names)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], list(self.label_names))


class CausalLMDataset(NamedTuple):
    """Texts for causal language modelling, ``E`` examples.

    Attributes:
      texts: ``E`` full strings (prompt + response for instruction data).
      prompts: ``E`` prompt prefixes of ``texts`` whose tokens carry no loss, or ``None``
        (every token is a target).
    """

    texts: list[str]
    prompts: list[str] | None = None

    def select(self, indices: Sequence[int] | np.ndarray) -> CausalLMDataset:
        """The examples at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        prompts = None if self.prompts is None else [self.prompts[i] for i in idx]
        return CausalLMDataset([self.texts[i] for i in idx], prompts)


# --------------------------------------------------------------------------- paths


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The offline data folder: ``$FEDLORA_DATA_DIR`` if set, else ``<repo root>/../shared/data``.

    Raises:
      FileNotFoundError: the folder does not exist (the message names the places searched).
    """
    env = os.environ.get(DATA_DIR_ENV)
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(_repo_root().parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(
        f"no offline data folder found; searched {[str(c) for c in candidates]}. "
        f"Set ${DATA_DIR_ENV} to a folder laid out like shared/data (sst2/, agnews/)."
    )


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path for ``source``: an existing path, or a named dataset in :data:`NAMED_DATASETS`.

    Raises:
      FileNotFoundError: neither an existing path nor a known name (the message says which
        paths were searched and which names exist).
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if name in NAMED_DATASETS:
        folder = shared_data_dir() / NAMED_DATASETS[name][0]
        if folder.is_dir():
            return folder
        raise FileNotFoundError(f"named dataset {name!r} expected at {folder}, which is missing")
    raise FileNotFoundError(
        f"source {name!r} is not an existing path (looked at {path.resolve()}) and not a named "
        f"dataset {sorted(NAMED_DATASETS)}; nothing is downloaded, pass a local path"
    )


def _find_split_files(folder: Path, split: str) -> list[Path]:
    """Split files in ``folder``: ``{split}.{ext}``, ``{split}/*.{ext}``, ``data/{split}-*.{ext}``."""
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        for ext in _SPLIT_FILE_EXTS:
            single = folder / f"{name}{ext}"
            if single.is_file():
                return [single]
        for pattern_dir, pattern in ((folder / name, "*"), (folder / "data", f"{name}[-_.]*")):
            if pattern_dir.is_dir():
                for ext in _SPLIT_FILE_EXTS:
                    files = sorted(pattern_dir.glob(pattern + ext))
                    if files:
                        return files
    return []


# --------------------------------------------------------------------------- datasets I/O


def _import_datasets():
    """Import ``datasets`` with the offline switches on (user settings win)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _load_files(files: Sequence[Path], split: str, cache_dir: str | None, *, scanned: bool = False):
    """``datasets.load_dataset`` on local split files; csv/tsv headers and row widths are checked first
    (``scanned=True``: the caller already did, with :func:`_scan_delimited`)."""
    suffixes = {f.suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FILE_BUILDERS:
        raise ValueError(
            f"cannot read {[str(f) for f in files]}: expected one of the extensions "
            f"{sorted(_FILE_BUILDERS)} (all files of one split the same)"
        )
    suffix = next(iter(suffixes))
    builder = _FILE_BUILDERS[suffix]
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        if not scanned:
            _raise_problems(_scan_split_files(files, columns=(), strict_width=False).problems)
        # Keep every field a string ("NA", "null" are texts, not missing values).
        kwargs.update(keep_default_na=False, na_filter=False)
        if suffix == ".tsv":
            kwargs.update(delimiter="\t", quoting=3)  # csv.QUOTE_NONE: fields are not quoted
    datasets = _import_datasets()
    return datasets.load_dataset(
        builder,
        data_files={split: [str(f) for f in files]},
        split=split,
        cache_dir=cache_dir,
        **kwargs,
    )


def _load_from_disk_dir(folder: Path, split: str):
    datasets = _import_datasets()
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        for name in (split, *SPLIT_ALIASES.get(split, ())):
            if name in loaded:
                return loaded[name]
        raise ValueError(f"split {split!r} not in {folder}; available splits: {list(loaded)}")
    return loaded


class _SplitSource(NamedTuple):
    """Where one split lives: ``kind`` "files" (``files`` read with a builder), "disk"
    (a ``save_to_disk`` folder) or "hub" (a Hub-format repository folder)."""

    kind: str
    path: Path
    split: str
    files: list[Path]

    @property
    def name(self) -> str:
        """How error messages name the source: the file, or the folder and the split."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.path} (split {self.split!r})"

    @property
    def delimited(self) -> bool:
        return self.kind == "files" and self.files[0].suffix.lower() in (".csv", ".tsv")


def _resolve_split(source: str | os.PathLike, split: str) -> _SplitSource:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    path = resolve_source(source)
    if path.is_file():
        return _SplitSource("files", path, split, [path])
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _SplitSource("disk", path, split, [])
    files = _find_split_files(path, split)
    if files:
        return _SplitSource("files", path, split, files)
    return _SplitSource("hub", path, split, [])


def _load_split(src: _SplitSource, cache_dir: str | None, *, scanned: bool = False):
    if src.kind == "files":
        return _load_files(src.files, src.split, cache_dir, scanned=scanned)
    if src.kind == "disk":
        return _load_from_disk_dir(src.path, src.split)
    # A Hub-format dataset repository on disk (README.md config, data files): let datasets
    # resolve its layout, still offline.
    datasets = _import_datasets()
    split = src.split
    try:
        return datasets.load_dataset(str(src.path), split=split, cache_dir=cache_dir)
    except Exception as err:  # re-raised with the searched folder named
        raise FileNotFoundError(
            f"no data for split {split!r} in {src.path}: looked for {split}.{{tsv,csv,jsonl,json,"
            f"parquet}}, {split}/*, data/{split}-* and a datasets layout ({err})"
        ) from err


def load_hf_split(source: str | os.PathLike, *, split: str, cache_dir: str | None = None):
    """Load one split of a local source as a ``datasets.Dataset`` (offline).

    Args:
      source: a file (csv, tsv, json, jsonl, parquet), a folder of split files
        (``train.tsv``, ``test/*.parquet``, ``data/train-00000-of-00001.parquet`` ...), a
        ``save_to_disk`` folder, or a name from :data:`NAMED_DATASETS`.
      split: split name (``"train"``, ``"test"``, ``"dev"``/``"validation"`` are aliases).
      cache_dir: ``datasets`` cache folder (default: the ``datasets`` default).

    Raises:
      FileNotFoundError: no file for ``split`` (the message names the folder searched).
      ValueError: a csv/tsv file with duplicate column names, a header that looks split by the
        wrong delimiter, or rows with more fields than the header (file and lines named).
    """
    return _load_split(_resolve_split(source, split), cache_dir)


# --------------------------------------------------------------------------- row checks

#: How many row numbers / values an error message lists before "and N more".
_ROWS_SHOWN = 5
#: Label strings read as "no label" (besides empty / whitespace-only), compared lower-cased.
#: "NA" and "None" are not among them: they are plausible class names.
_MISSING_LABEL_STRINGS = frozenset({"nan", "null", "<na>", "n/a", "#n/a"})
_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
_DELIMITER_SUFFIX = {",": ".csv", "\t": ".tsv"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _shown(items: Sequence[Any]) -> str:
    """``"5, 9"`` / ``"1, 2, 3, 4, 5 and 867 more"``."""
    head = ", ".join(str(x) for x in items[:_ROWS_SHOWN])
    return head if len(items) <= _ROWS_SHOWN else f"{head} and {len(items) - _ROWS_SHOWN} more"


class _FileRows(NamedTuple):
    path: Path
    start: int  # split index of the file's first data row
    count: int
    lines: list[int] | None  # 1-based file line where each data row starts


class _RowIndex:
    """Maps split row indices to (file, 1-based data row, file line) for error messages.

    ``header``: the files have a header line (csv/tsv), which data rows do not count.
    """

    def __init__(self, name: str, files: list[_FileRows] | None, *, header: bool = False):
        self.name = name
        self.files = files
        self.header = header

    def groups(self, indices: Sequence[int]) -> list[tuple[str, list[int], list[int] | None]]:
        """``(file name, split indices, file lines or None)`` per file holding ``indices``."""
        if not self.files:
            return [(self.name, list(indices), None)]
        out = []
        for fr in self.files:
            idx = [i for i in indices if fr.start <= i < fr.start + fr.count]
            if idx:
                out.append((str(fr.path), idx, None if fr.lines is None else [fr.lines[i - fr.start] for i in idx]))
        return out

    def _row(self, i: int) -> int:
        """1-based data row of split index ``i`` within its file."""
        if self.files:
            for fr in self.files:
                if fr.start <= i < fr.start + fr.count:
                    return i - fr.start + 1
        return i + 1

    def problem(self, column: str | None, indices: Sequence[int], what: tuple[str, str],
                values: Sequence[Any] | None = None, note: str = "") -> list[str]:
        """One message per file: ``"<file>: column 'label': 2 rows have no label (data rows 5, 9 ...)"``.

        ``what`` is the (singular, plural) predicate, e.g. ``("has no label", "have no label")``;
        ``values`` (aligned with ``indices``) are quoted after the rows unless all are empty or
        None; ``note`` ends the message.
        """
        by_index = dict(zip(indices, values, strict=True)) if values is not None else {}
        msgs = []
        for name, idx, lines in self.groups(list(indices)):
            rows = [self._row(i) for i in idx]
            where = f"{'data row' if len(rows) == 1 else 'data rows'} {_shown(rows)}, 1-based"
            if self.header:
                where += ", header not counted"
            if lines is not None:
                where += f"; {'file line' if len(lines) == 1 else 'file lines'} {_shown(lines)}"
            shown = [_plain(by_index[i]) for i in idx] if by_index else []
            if any(v is not None and v != "" for v in shown):
                where += f"; {'value' if len(shown) == 1 else 'values'} {_shown([repr(v) for v in shown])}"
            verb = what[0] if len(rows) == 1 else what[1]
            col = "" if column is None else f"column {column!r}: "
            msgs.append(f"{name}: {col}{_plural(len(rows), 'row', 'rows')} {verb} ({where}){note}")
        return msgs


def _plain(v: Any) -> Any:
    """NumPy scalars as Python values, for messages."""
    return v.item() if isinstance(v, np.generic) else v


def _raise_problems(problems: Sequence[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def _label_kind(v: Any) -> str:
    """``"missing"``, ``"int"`` (also 3.0, ``"3"``, ``"3.0"``), ``"float"`` (3.5, ``"3.5"``),
    ``"str"`` or ``"other"`` (bool, list, dict ...)."""
    if v is None or _is_nan(v):
        return "missing"
    if isinstance(v, (bool, np.bool_)):
        return "other"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "int" if math.isfinite(v) and float(v).is_integer() else "float"
    if isinstance(v, str):
        s = v.strip()
        if not s or s.lower() in _MISSING_LABEL_STRINGS:
            return "missing"
        if _INTEGER.fullmatch(s):
            return "int"
        if _NUMBER.fullmatch(s):
            return "int" if float(s).is_integer() else "float"
        return "str"
    return "other"


def _label_int(v: Any) -> int:
    """The class id of a label of kind "int"."""
    if isinstance(v, str):
        s = v.strip()
        return int(s) if _INTEGER.fullmatch(s) else int(float(s))
    return int(v)


def _row_problems(texts: Sequence[Any], labels: Sequence[Any], *, text_column: str, label_column: str,
                  rows: _RowIndex, class_label: bool = False, skip: frozenset[int] = frozenset()) -> list[str]:
    """Every problem with the text and label values of a split, as messages naming file, column, rows.

    Texts: missing (None / NaN), empty or whitespace-only, or not text (a list, a dict, a bool).
    Labels: missing (None, NaN, empty, ``"nan"``/``"null"``/``"N/A"``; -1 for a ``ClassLabel``), of
    a kind the rest of the column is not (a word among integer labels, a number among words), not
    an integer (3.5), negative, or neither a string nor an integer. Rows in ``skip`` (already
    reported, e.g. a wrong number of fields) are not looked at.
    """
    problems: list[str] = []
    no_text, empty_text, bad_text = [], [], []
    for i, t in enumerate(texts):
        if i in skip:
            continue
        if t is None or _is_nan(t):
            no_text.append(i)
        elif isinstance(t, str):
            if not t.strip():
                empty_text.append(i)
        elif isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            bad_text.append(i)
    if no_text:
        problems += rows.problem(text_column, no_text, ("has no text", "have no text"))
    if empty_text:
        problems += rows.problem(text_column, empty_text, ("has an empty text", "have an empty text"),
                                 [texts[i] for i in empty_text])
    if bad_text:
        problems += rows.problem(text_column, bad_text, ("has a text that is not a string",
                                                         "have a text that is not a string"),
                                 [texts[i] for i in bad_text])

    kinds: dict[str, list[int]] = {"missing": [], "int": [], "float": [], "str": [], "other": []}
    for i, v in enumerate(labels):
        if i in skip:
            continue
        if class_label:
            kinds["missing" if v is None or int(v) == -1 else "int"].append(i)
        else:
            kinds[_label_kind(v)].append(i)
    if kinds["missing"]:
        problems += rows.problem(label_column, kinds["missing"], ("has no label", "have no label"),
                                 [labels[i] for i in kinds["missing"]])
    if kinds["other"]:
        problems += rows.problem(label_column, kinds["other"],
                                 ("has a label that is neither a string nor an integer",
                                  "have a label that is neither a string nor an integer"),
                                 [labels[i] for i in kinds["other"]])
    n_num, n_str = len(kinds["int"]) + len(kinds["float"]), len(kinds["str"])
    integer_column = n_num >= n_str
    if integer_column:
        bad = sorted(kinds["float"] + kinds["str"])
        if bad:
            n_ok = len(kinds["int"])
            note = (f"; the column's other {_plural(n_ok, 'label is an integer', 'labels are integers')}"
                    if n_ok else "; class labels must be integer ids or strings")
            problems += rows.problem(label_column, bad, ("has a label that is not an integer",
                                                         "have a label that is not an integer"),
                                     [labels[i] for i in bad], note)
        negative = [i for i in kinds["int"] if _label_int(labels[i]) < 0]
        if negative:
            problems += rows.problem(label_column, negative, ("has a negative label", "have a negative label"),
                                     [labels[i] for i in negative],
                                     "; class ids must be >= 0 (-1 usually marks an unlabelled test split)")
    elif n_num:
        bad = sorted(kinds["int"] + kinds["float"])
        problems += rows.problem(label_column, bad, ("has a numeric label", "have a numeric label"),
                                 [labels[i] for i in bad],
                                 f"; the column's other {_plural(n_str, 'label is a word', 'labels are words')}")
    return problems


def _encode_rows(values: Sequence[Any], *, label_names: Sequence[str] | None, class_names: list[str] | None,
                 label_column: str, rows: _RowIndex) -> tuple[np.ndarray, list[str]]:
    """:func:`encode_labels` for checked rows; a label outside ``label_names`` is an error naming
    the label, its rows and the names allowed."""
    if len(values) == 0:
        names = list(label_names) if label_names is not None else list(class_names or [])
        return np.zeros((0,), np.int32), [str(n) for n in names]
    if class_names is not None:
        if label_names is None or list(label_names) == class_names:
            return np.asarray(values, np.int32), list(class_names)
        values = [class_names[int(v)] for v in values]  # map ClassLabel ids by name
    given = label_names is not None
    hint = " (for a test split: a label the training split does not have)" if given else ""
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values)) if not given else [str(n) for n in label_names]
        lookup = {n: i for i, n in enumerate(names)}
        unknown: dict[Any, list[int]] = {}
        for i, v in enumerate(values):
            if v not in lookup:
                unknown.setdefault(v, []).append(i)
        problems = []
        for v, idx in list(unknown.items())[:_ROWS_SHOWN]:
            problems += rows.problem(label_column, idx, (f"has the label {v!r}", f"have the label {v!r}"),
                                     note=f", which is not in label_names {names}{hint}")
        if len(unknown) > _ROWS_SHOWN:
            problems.append(f"{rows.name}: column {label_column!r}: {len(unknown) - _ROWS_SHOWN} more labels "
                            f"not in label_names: {sorted(map(str, unknown))[:20]}")
        _raise_problems(problems)
        return np.asarray([lookup[v] for v in values], np.int32), names
    ids = np.asarray([_label_int(v) for v in values], np.int64)
    names = [str(i) for i in range(int(ids.max()) + 1)] if not given else [str(n) for n in label_names]
    problems = []
    for v in sorted({int(x) for x in ids[ids >= len(names)]})[:_ROWS_SHOWN]:
        idx = np.flatnonzero(ids == v).tolist()
        problems += rows.problem(label_column, idx, (f"has the label {v}", f"have the label {v}"),
                                 note=f", out of range for the {len(names)} label_names {names} "
                                      f"(class ids 0..{len(names) - 1}){hint}")
    _raise_problems(problems)
    return ids.astype(np.int32), names


# --------------------------------------------------------------------------- csv / tsv scan


class _Scan(NamedTuple):
    header: list[str]
    files: list[_FileRows]
    values: dict[str, list[str | None]]  # requested column -> one raw string per data row (None: no field)
    bad_width: frozenset[int]  # split indices of rows with the wrong number of fields
    problems: list[str]


def _dialect(path: Path) -> tuple[str, int]:
    if path.suffix.lower() == ".tsv":
        return "\t", csv.QUOTE_NONE
    return ",", csv.QUOTE_MINIMAL


def _split_header(line: str, delimiter: str, quoting: int) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter, quoting=quoting), [])


def _delimiter_hint(path: Path, header_line: str, wanted: Sequence[str] = (), any_of: Sequence[str] = ()) -> str:
    """``"; split by comma (',') the header has the columns [...]: ..."`` when another delimiter
    would work: the header is one column with the file's own delimiter but several with the other
    one, or the other one yields every ``wanted`` column (and one of ``any_of``); else ``""``."""
    delimiter, quoting = _dialect(path)
    one_column = len(_split_header(header_line, delimiter, quoting)) == 1
    for alt, alt_name in _DELIMITER_NAMES.items():
        if alt == delimiter:
            continue
        cols = _split_header(header_line, alt, csv.QUOTE_MINIMAL)
        finds = bool(wanted or any_of) and all(w in cols for w in wanted) and (
            not any_of or any(c in cols for c in any_of))
        if len(cols) < 2 or not (one_column or finds):
            continue
        fix = (f"rename it to {_DELIMITER_SUFFIX[alt]}" if alt in _DELIMITER_SUFFIX
               else "save it comma-separated (.csv) or tab-separated (.tsv)")
        return (f"; split by {alt_name} ({alt!r}) the header has the columns {cols}: the file looks "
                f"{alt_name}-separated, {fix} ({path.suffix} files are read {_DELIMITER_NAMES[delimiter]}-separated)")
    return ""


def _header_line(path: Path) -> str:
    """The first non-blank line (undecodable bytes replaced: the full scan reports them)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def _scan_delimited(path: Path, *, start: int, columns: Sequence[str], strict_width: bool
                    ) -> tuple[list[str], _FileRows, dict[str, list[str | None]], frozenset[int], list[str]]:
    """Read one csv/tsv file with the dialect ``datasets`` uses for it; returns
    ``(header, _FileRows, {column: raw values}, bad-width indices, problems)``.

    Blank and whitespace-only lines are skipped, as pandas does. Problems: an empty file, duplicate
    column names, a header that is one column but several with another delimiter, rows with more
    fields than the header (and, with ``strict_width``, fewer).
    """
    delimiter, quoting = _dialect(path)
    problems: list[str] = []
    header: list[str] | None = None
    lines: list[int] = []
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    wide: dict[int, list[int]] = {}  # field count -> local row indices
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            prev_line = 0
            col_at: dict[str, int] = {}
            for rec in reader:
                first_line, prev_line = prev_line + 1, reader.line_num
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue
                if header is None:
                    header = rec
                    col_at = {c: header.index(c) for c in columns if c in header}
                    continue
                local = len(lines)
                lines.append(first_line)
                if len(rec) != len(header) and (len(rec) > len(header) or strict_width):
                    wide.setdefault(len(rec), []).append(local)
                for c in columns:
                    j = col_at.get(c)
                    values[c].append(rec[j] if j is not None and j < len(rec) else None)
    except UnicodeDecodeError as err:
        return [], _FileRows(path, start, 0, None), values, frozenset(), [
            f"{path}: not UTF-8 text ({err}); save it as UTF-8"]
    except csv.Error as err:
        return [], _FileRows(path, start, 0, None), values, frozenset(), [
            f"{path}: cannot parse line {reader.line_num}: {err}"]
    finally:
        csv.field_size_limit(old_limit)
    fr = _FileRows(path, start, len(lines), lines)
    if header is None:
        return [], fr, values, frozenset(), [f"{path}: the file is empty (no header line)"]
    seen: dict[str, list[int]] = {}
    for j, name in enumerate(header):
        seen.setdefault(name, []).append(j + 1)
    dups = {n: pos for n, pos in seen.items() if len(pos) > 1}
    if dups:
        listed = ", ".join(f"{n!r} (columns {', '.join(map(str, pos))})" for n, pos in dups.items())
        problems.append(f"{path}: duplicate column names in the header: {listed}; column names must be unique")
    if len(header) == 1:
        hint = _delimiter_hint(path, _header_line(path))
        if hint:
            problems.append(f"{path}: the header {header[0]!r} is a single column{hint}")
            return header, fr, values, frozenset(), problems  # every row would be misreported
    rows = _RowIndex(str(path), [fr], header=True)
    bad = set()
    for n_fields, local in sorted(wide.items(), key=lambda kv: kv[1][0]):
        bad.update(local)
        more = n_fields > len(header)
        why = (" (a tab inside a text? .tsv fields are not quoted)" if more and delimiter == "\t"
               else " (an unquoted comma inside a text?)" if more else "")
        problems += rows.problem(None, [start + j for j in local],
                                 (f"has {_plural(n_fields, 'field', 'fields')}",
                                  f"have {_plural(n_fields, 'field', 'fields')}"),
                                 note=f" but the header has {len(header)} columns {header}{why}")
    return header, fr, values, frozenset(bad), problems


def _scan_split_files(files: Sequence[Path], *, columns: Sequence[str], strict_width: bool) -> _Scan:
    """:func:`_scan_delimited` over the files of one split, indices running across them."""
    header: list[str] = []
    out_files: list[_FileRows] = []
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    bad: set[int] = set()
    problems: list[str] = []
    start = 0
    for path in files:
        h, fr, vals, bad_i, probs = _scan_delimited(path, start=start, columns=columns, strict_width=strict_width)
        problems += probs
        if not header:
            header = h
        elif h and h != header:
            problems.append(f"{path}: header {h} differs from the header {header} of {files[0]} (same split)")
        out_files.append(fr)
        for c in columns:
            values[c] += vals[c]
        bad |= {start + j for j in bad_i}
        start += fr.count
    return _Scan(header, out_files, values, frozenset(bad), problems)


def _row_index(src: _SplitSource, n_rows: int, scanned: list[_FileRows] | None = None) -> _RowIndex:
    """Row locations for a loaded split of ``n_rows``: per file (and line, for csv/tsv/jsonl) when
    the files' row counts add up to ``n_rows``, else 1-based rows of the split."""
    files = scanned
    if files is None and src.kind == "files":
        files = []
        start = 0
        for path in src.files:
            fr = _count_rows(path, start)
            if fr is None:
                files = None
                break
            files.append(fr)
            start += fr.count
    if files is not None and sum(f.count for f in files) != n_rows:
        files = None
    if files is None and len(src.files) == 1:
        files = [_FileRows(src.files[0], 0, n_rows, None)]
    return _RowIndex(src.name, files, header=src.delimited)


def _count_rows(path: Path, start: int) -> _FileRows | None:
    """Rows (and their lines) of a json-lines or parquet file; ``None`` when unknown."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _FileRows(path, start, pq.ParquetFile(str(path)).metadata.num_rows, None)
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                first = f.read(1)
                while first and first.isspace():
                    first = f.read(1)
                if first != "{":  # a JSON array / document, not JSON lines
                    return None
                f.seek(0)
                lines = [n for n, line in enumerate(f, 1) if line.strip()]
            return _FileRows(path, start, len(lines), lines)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- labels


def _column(ds, name: str, role: str) -> list[Any]:
    if name not in ds.column_names:
        raise ValueError(f"{role} column {name!r} not found; available columns: {ds.column_names}")
    return list(ds[name])


def detect_text_column(column_names: Sequence[str]) -> str:
    """The first of :data:`TEXT_COLUMN_CANDIDATES` present in ``column_names``."""
    for cand in TEXT_COLUMN_CANDIDATES:
        if cand in column_names:
            return cand
    raise ValueError(
        f"no text column found among {list(TEXT_COLUMN_CANDIDATES)}; available columns: "
        f"{list(column_names)}; pass text_column="
    )


def encode_labels(
    values: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to int32 class ids, deterministically.

    Strings map to their position in ``label_names`` (default: the sorted unique strings).
    Integers are kept as class ids (``label_names`` default: ``"0" .. str(max)``).

    Returns:
      ``(labels [E] int32, label_names)``.

    Raises:
      ValueError: a label not in ``label_names``, a negative or out-of-range integer, or
        mixed label types.
    """
    if len(values) == 0:
        return np.zeros((0,), np.int32), list(label_names or [])
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values)) if label_names is None else [str(n) for n in label_names]
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise ValueError(f"labels {unknown[:10]} are not in label_names={names}")
        return np.asarray([lookup[v] for v in values], np.int32), names
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        arr = np.asarray(values, np.int64)
        if arr.min() < 0:
            raise ValueError(
                f"integer labels must be >= 0, got min {int(arr.min())} (unlabelled test split?)"
            )
        if label_names is None:
            names = [str(i) for i in range(int(arr.max()) + 1)]
        else:
            names = [str(n) for n in label_names]
            if arr.max() >= len(names):
                raise ValueError(
                    f"integer label {int(arr.max())} out of range for label_names={names}"
                )
        return arr.astype(np.int32), names
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(f"labels must be all strings or all integers, got types {kinds}")


def load_text_classification(
    source: str | os.PathLike,
    *,
    split: str,
    text_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    max_examples: int | None = None,
    cache_dir: str | None = None,
) -> TextDataset:
    """Load one split of a text-classification dataset, offline, checking every row first.

    Every row of the split is checked before anything is returned (csv/tsv files before they
    are even handed to ``datasets``); all problems found are reported together in one
    ``ValueError``, one line per problem, naming the file, the column, how many rows, the first
    few rows (1-based data rows, header not counted, and the file lines for csv/tsv/jsonl) and
    the offending values. Checked: duplicate or missing columns; a csv/tsv header that only makes
    sense with another delimiter (the hint names it); rows with the wrong number of fields; texts
    missing, empty or not strings; labels missing (empty, None, NaN, ``"nan"``, ``"null"``,
    ``"N/A"``), not of the column's type (a word among integer labels, ``3.5``, a number among
    words) or negative; with ``label_names``, a label outside them (for a test split read with
    the training split's names: a label never seen in training).

    Args:
      source: see :func:`load_hf_split` (a file, a folder, a ``datasets`` folder, or
        ``"sst2"`` / ``"agnews"``).
      split: split name.
      text_column: text column; default: the first of ``sentence``, ``text``, ``content``.
      label_column: label column.
      label_names: class names fixing the string-to-id map (default: sorted unique strings,
        or the ``ClassLabel`` names of a ``datasets`` feature). String labels map by name,
        integer labels are indices into it, ``ClassLabel`` ids map by their names.
      max_examples: keep only the first ``max_examples`` rows (``None``: all). The whole split
        is still checked; only the kept rows are matched against ``label_names``.
      cache_dir: ``datasets`` cache folder.

    Returns:
      A :class:`TextDataset` with ``labels [E]`` int32.

    Raises:
      ValueError: a missing column (the message lists the columns available), bad rows or
        labels (see above), e.g. ``data/train.csv: column 'label': 2 rows have no label
        (data rows 5, 9, 1-based, header not counted; file lines 6, 10; values '', '')``.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples must be None or an int >= 1, got {max_examples!r}")
    src = _resolve_split(source, split)
    scan = None
    if src.delimited:
        first = src.files[0]
        header_line = _header_line(first)
        if not header_line:
            raise ValueError(f"{first}: the file is empty (no header line)")
        text_column = _check_columns(src.name, _split_header(header_line, *_dialect(first)), text_column,
                                     label_column, lambda *want: _delimiter_hint(first, header_line, *want))
        scan = _scan_split_files(src.files, columns=(text_column, label_column), strict_width=True)
        raw_rows = _RowIndex(src.name, scan.files, header=True)
        _raise_problems(scan.problems + _row_problems(
            scan.values[text_column], scan.values[label_column], text_column=text_column,
            label_column=label_column, rows=raw_rows, skip=scan.bad_width))
    ds = _load_split(src, cache_dir, scanned=scan is not None)
    text_column = _check_columns(src.name, ds.column_names, text_column, label_column)
    rows = _row_index(src, len(ds), None if scan is None else scan.files)
    feature = ds.features.get(label_column)
    class_names = list(feature.names) if hasattr(feature, "names") else None  # datasets.ClassLabel
    texts = list(ds[text_column])
    raw_labels = list(ds[label_column])
    _raise_problems(_row_problems(texts, raw_labels, text_column=text_column, label_column=label_column,
                                  rows=rows, class_label=class_names is not None))
    if max_examples is not None and max_examples < len(texts):
        texts, raw_labels = texts[:max_examples], raw_labels[:max_examples]
    labels, names = _encode_rows(raw_labels, label_names=label_names, class_names=class_names,
                                 label_column=label_column, rows=rows)
    return TextDataset([str(t) for t in texts], labels, names)


def _check_columns(name: str, columns: Sequence[str], text_column: str | None, label_column: str,
                   hint: Callable[[Sequence[str], Sequence[str]], str] | None = None) -> str:
    """The text column (detected when ``None``); errors name the source, the columns available and,
    via ``hint(wanted columns, any of these columns)``, a delimiter that would have found them."""
    columns = list(columns)

    def fail(msg: str, wanted: Sequence[str], any_of: Sequence[str] = ()):
        raise ValueError(f"{name}: {msg}{hint(wanted, any_of) if hint else ''}")

    if text_column is None:
        try:
            text_column = detect_text_column(columns)
        except ValueError as err:
            fail(str(err), (), TEXT_COLUMN_CANDIDATES)
    if label_column not in columns:
        fail(f"label column {label_column!r} not found; available columns: {columns}", (label_column,))
    if text_column not in columns:
        fail(f"text column {text_column!r} not found; available columns: {columns}", (text_column,))
    return text_column


def load_causal_lm(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_column: str | None = None,
    instruction_column: str = "instruction",
    input_column: str = "input",
    response_column: str | None = None,
    template: str = ALPACA_TEMPLATE,
    input_template: str = ALPACA_INPUT_TEMPLATE,
    max_examples: int | None = None,
    cache_dir: str | None = None,
) -> CausalLMDataset:
    """Load causal-LM or instruction data (e.g. a jsonl file), offline.

    Plain text: ``text_column`` (default ``"text"`` when present) gives every token as a
    target. Instruction data (``instruction`` + ``response``/``output`` columns, optional
    ``input``): ``prompt = template.format(instruction=...)`` (``input_template`` when the
    input field is non-empty), ``text = prompt + response``; the prompt tokens carry no loss.

    ASSUMPTION: Alpaca-style template by default; pass ``template`` / ``input_template`` for
    another format.

    Raises:
      ValueError: no usable columns (the message lists the columns available).
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples must be None or an int >= 1, got {max_examples!r}")
    ds = load_hf_split(source, split=split, cache_dir=cache_dir)
    if max_examples is not None and max_examples < len(ds):
        ds = ds.select(range(max_examples))
    cols = ds.column_names
    if text_column is None and "text" in cols:
        text_column = "text"
    if text_column is not None:
        return CausalLMDataset([str(t) for t in _column(ds, text_column, "text")], None)
    if response_column is None:
        response_column = next((c for c in ("response", "output") if c in cols), "response")
    if instruction_column not in cols or response_column not in cols:
        raise ValueError(
            f"need a text column or instruction/response columns ({instruction_column!r}, "
            f"{response_column!r}); available columns: {cols}"
        )
    instructions = _column(ds, instruction_column, "instruction")
    responses = _column(ds, response_column, "response")
    inputs = list(ds[input_column]) if input_column in cols else [""] * len(ds)
    prompts = []
    for instr, inp in zip(instructions, inputs, strict=True):
        if inp:
            prompts.append(input_template.format(instruction=instr, input=inp))
        else:
            prompts.append(template.format(instruction=instr))
    texts = [p + str(r) for p, r in zip(prompts, responses, strict=True)]
    return CausalLMDataset(texts, prompts)
