"""Loading labelled text and causal-LM text from local files, folders and ``datasets`` dirs.

Everything here is offline: sources are local paths (a file, a folder of split files, a
``datasets.save_to_disk`` folder or a Hub-format dataset repository already on disk), or the
named shortcuts ``"sst2"`` / ``"agnews"`` that resolve inside :func:`shared_data_dir`.
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` are set in-process (unless the user set
them) before ``datasets`` is imported, so no code path reaches for the network.

Example:
    >>> ds = load_text_classification("sst2", split="test")      # doctest: +SKIP
    >>> len(ds.texts), ds.labels.shape, ds.label_names            # doctest: +SKIP
    (872, (872,), ['0', '1'])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def _load_files(files: Sequence[Path], split: str, cache_dir: str | None):
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
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    path = resolve_source(source)
    if path.is_file():
        return _load_files([path], split, cache_dir)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_from_disk_dir(path, split)
    files = _find_split_files(path, split)
    if files:
        return _load_files(files, split, cache_dir)
    # A Hub-format dataset repository on disk (README.md config, data files): let datasets
    # resolve its layout, still offline.
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
    except Exception as err:  # re-raised with the searched folder named
        raise FileNotFoundError(
            f"no data for split {split!r} in {path}: looked for {split}.{{tsv,csv,jsonl,json,"
            f"parquet}}, {split}/*, data/{split}-* and a datasets layout ({err})"
        ) from err


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
    """Load one split of a text-classification dataset, offline.

    Args:
      source: see :func:`load_hf_split` (a file, a folder, a ``datasets`` folder, or
        ``"sst2"`` / ``"agnews"``).
      split: split name.
      text_column: text column; default: the first of ``sentence``, ``text``, ``content``.
      label_column: label column.
      label_names: class names fixing the string-to-id map (default: sorted unique strings,
        or the ``ClassLabel`` names of a ``datasets`` feature).
      max_examples: keep only the first ``max_examples`` rows (``None``: all).
      cache_dir: ``datasets`` cache folder.

    Returns:
      A :class:`TextDataset` with ``labels [E]`` int32.

    Raises:
      ValueError: a missing column (the message lists the columns available), bad labels.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples must be None or an int >= 1, got {max_examples!r}")
    ds = load_hf_split(source, split=split, cache_dir=cache_dir)
    if text_column is None:
        text_column = detect_text_column(ds.column_names)
    if label_column not in ds.column_names:
        raise ValueError(
            f"label column {label_column!r} not found; available columns: {ds.column_names}"
        )
    if text_column not in ds.column_names:
        raise ValueError(
            f"text column {text_column!r} not found; available columns: {ds.column_names}"
        )
    if max_examples is not None and max_examples < len(ds):
        ds = ds.select(range(max_examples))
    feature = ds.features.get(label_column)
    if label_names is None and hasattr(feature, "names"):  # datasets.ClassLabel
        label_names = list(feature.names)
    texts = [str(t) for t in _column(ds, text_column, "text")]
    labels, names = encode_labels(_column(ds, label_column, "label"), label_names=label_names)
    return TextDataset(texts, labels, names)


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
