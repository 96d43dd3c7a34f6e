"""Tokenization to static ``[E, T]`` arrays, with an on-disk ``.npz`` cache.

The tokenizer is any object with the Hugging Face ``__call__`` API (``tokenizer(texts,
truncation=True, max_length=T)`` returning ``input_ids``). Sequences are truncated to
``T = max_length`` and right-padded with ``pad_token_id`` (0 when the tokenizer has none; the
attention mask hides it).

Cache key: the dataset fingerprint (content hash of texts, labels / prompts), the tokenizer
fingerprint (hash of its ``tokenizer.json`` state or vocabulary, plus its class and padding
side) and ``max_length``. Files are written atomically (temporary file + ``os.replace``) and
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedlora_jax._atomic import atomic_write
from fedlora_jax.data.loading import CausalLMDataset, TextDataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CACHE_FORMAT_VERSION = "1"
_ARRAY_FIELDS = ("input_ids", "attention_mask", "labels")


class TokenizedDataset(NamedTuple):
    """Static-shape token arrays for ``E`` examples of ``T`` tokens.

    Attributes:
      input_ids: ``[E, T]`` int32, right-padded.
      attention_mask: ``[E, T]`` int32, 1 = real token.
      labels: ``[E]`` int32 class ids (classification), or ``[E, T]`` int32 token targets for
        causal LM (``input_ids`` with :data:`IGNORE_INDEX` on padding and prompt tokens; not
        shifted: the loss shifts).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])


class CacheInfo(NamedTuple):
    """What :func:`tokenize` did with the cache.

    Attributes:
      hit: True when the arrays came from the cache file.
      path: the cache file (``None`` without ``cache_dir``).
      key: the cache key (hex digest).
    """

    hit: bool
    path: Path | None
    key: str


def dataset_fingerprint(dataset: TextDataset | CausalLMDataset) -> str:
    """SHA-256 of the dataset content (texts, labels or prompts), independent of object id."""
    h = hashlib.sha256()
    h.update(type(dataset).__name__.encode())
    for text in dataset.texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    if isinstance(dataset, TextDataset):
        labels = np.ascontiguousarray(np.asarray(dataset.labels, np.int64))
        h.update(str(labels.shape).encode())
        h.update(labels.tobytes())
        h.update(json.dumps(list(dataset.label_names)).encode())
    elif dataset.prompts is not None:
        for prompt in dataset.prompts:
            raw = prompt.encode("utf-8")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 identifying a tokenizer's behaviour.

    Uses, in order of preference: the fast tokenizer's serialized state
    (``backend_tokenizer.to_str()`` without its mutable ``truncation``/``padding`` settings),
    the vocabulary (``get_vocab()``), or ``name_or_path``; always plus the class name,
    padding side and pad id.
    """
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(getattr(tokenizer, "pad_token_id", None)).encode())
    h.update(str(getattr(tokenizer, "padding_side", "right")).encode())
    return h.hexdigest()


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _encode(tokenizer: Any, texts: list[str], max_length: int, chunk: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[start : start + chunk], truncation=True, max_length=max_length, padding=False
        )
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _pad(ids: list[list[int]], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.full((len(ids), max_length), pad_id, np.int32)
    attention_mask = np.zeros((len(ids), max_length), np.int32)
    for i, row in enumerate(ids):
        n = min(len(row), max_length)
        input_ids[i, :n] = row[:n]
        attention_mask[i, :n] = 1
    return input_ids, attention_mask


def tokenize_uncached(
    dataset: TextDataset | CausalLMDataset, tokenizer: Any, *, max_length: int, chunk: int = 1024
) -> TokenizedDataset:
    """Tokenize ``dataset`` to ``[E, T]`` arrays (no cache). See :func:`tokenize`."""
    if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not isinstance(dataset, (TextDataset, CausalLMDataset)):
        raise TypeError(
            f"dataset must be a TextDataset or CausalLMDataset, got {type(dataset).__name__}"
        )
    texts = list(dataset.texts)
    input_ids, attention_mask = _pad(
        _encode(tokenizer, texts, max_length, chunk), max_length, _pad_id(tokenizer)
    )
    if isinstance(dataset, TextDataset):
        labels = np.asarray(dataset.labels, np.int32).reshape(-1)
        if labels.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but labels of shape {labels.shape}")
        return TokenizedDataset(input_ids, attention_mask, labels)
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
    if dataset.prompts is not None:
        prompt_ids = _encode(tokenizer, list(dataset.prompts), max_length, chunk)
        for i, row in enumerate(prompt_ids):
            labels[i, : len(row)] = IGNORE_INDEX
    return TokenizedDataset(input_ids, attention_mask, labels)


def cache_key(dataset: TextDataset | CausalLMDataset, tokenizer: Any, *, max_length: int) -> str:
    """Hex key of (dataset fingerprint, tokenizer fingerprint, ``max_length``, format)."""
    parts = [
        _CACHE_FORMAT_VERSION,
        dataset_fingerprint(dataset),
        tokenizer_fingerprint(tokenizer),
        str(int(max_length)),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _save_atomic(path: Path, data: TokenizedDataset) -> None:
    atomic_write(path, lambda f: np.savez(f, **data._asdict()))


def _load(path: Path) -> TokenizedDataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return TokenizedDataset(*(np.asarray(z[k]) for k in _ARRAY_FIELDS))
    except (OSError, ValueError, KeyError, EOFError) as err:
        logger.warning("ignoring unreadable tokenization cache %s (%s)", path, err)
        return None


def tokenize(
    dataset: TextDataset | CausalLMDataset,
    tokenizer: Any,
    *,
    max_length: int,
    cache_dir: str | os.PathLike | None = None,
    return_info: bool = False,
) -> TokenizedDataset | tuple[TokenizedDataset, CacheInfo]:
    """Tokenize to static ``[E, T]`` arrays (``T = max_length``), cached on disk.

    Args:
      dataset: a :class:`TextDataset` (labels ``[E]``) or :class:`CausalLMDataset`
        (labels ``[E, T]``, prompt and padding tokens set to :data:`IGNORE_INDEX`).
      tokenizer: an object with the Hugging Face ``__call__`` API.
      max_length: ``T``; longer sequences are truncated, shorter ones right-padded.
      cache_dir: folder for ``tok-<key>.npz`` files; ``None`` disables the cache.
      return_info: also return a :class:`CacheInfo` (``hit`` tells a cache hit).

    Returns:
      A :class:`TokenizedDataset`, or ``(TokenizedDataset, CacheInfo)`` with ``return_info``.
    """
    key = cache_key(dataset, tokenizer, max_length=max_length) if cache_dir is not None else ""
    path = Path(cache_dir) / f"tok-{key}.npz" if cache_dir is not None else None
    result: TokenizedDataset | None = None
    if path is not None and path.is_file():
        result = _load(path)
        if result is not None and result.input_ids.shape != (len(dataset.texts), max_length):
            logger.warning("ignoring tokenization cache %s of wrong shape", path)
            result = None
    hit = result is not None
    if result is None:
        result = tokenize_uncached(dataset, tokenizer, max_length=max_length)
        if path is not None:
            _save_atomic(path, result)
    logger.info(
        "tokenize: %d examples, T=%d, cache %s%s",
        result.num_examples,
        max_length,
        "hit" if hit else ("miss" if path is not None else "off"),
        f" ({path})" if path is not None else "",
    )
    info = CacheInfo(hit, path, key)
    return (result, info) if return_info else result


# ------------------------------------------------------------- chat templates, label-word prompts

#: Prompt of classification as generation (no chat template); the answer is ``" " + label word``.
CLS_PROMPT_TEMPLATE = "Classify the text as one of: {choices}.\nText: {text}\nAnswer:"
#: The user turn of the same prompt under a chat template (the answer is the assistant turn).
CLS_CHAT_TEMPLATE = "Classify the text as one of: {choices}.\nText: {text}\nAnswer with the label only."


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` has a chat template (``apply_chat_template`` would use one)."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def chat_prompt(tokenizer: Any, user: str) -> str:
    """``user`` as one user turn under the tokenizer's chat template, with the generation prompt
    (the assistant's turn opening) appended: the text the response follows."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def apply_chat_template(dataset: CausalLMDataset, tokenizer: Any, *, add_eos: bool = True) -> CausalLMDataset:
    """Instruction data with each prompt wrapped in the tokenizer's chat template.

    ``dataset.prompts`` are prefixes of ``dataset.texts``: the response is
    ``text[len(prompt):]``; the new prompt is :func:`chat_prompt` of the old one and the new
    text is ``new_prompt + response`` (+ the tokenizer's EOS token with ``add_eos``, so the
    model learns to stop). Datasets without prompts (whole-text LM) and tokenizers without a
    chat template are returned unchanged.
    """
    if dataset.prompts is None or not has_chat_template(tokenizer):
        return dataset
    eos = (getattr(tokenizer, "eos_token", None) or "") if add_eos else ""
    prompts, texts = [], []
    for text, prompt in zip(dataset.texts, dataset.prompts, strict=True):
        if not text.startswith(prompt):
            raise ValueError(f"prompt {prompt[:40]!r}... is not a prefix of its text {text[:40]!r}...")
        p = chat_prompt(tokenizer, prompt.rstrip())
        prompts.append(p)
        texts.append(p + text[len(prompt):].lstrip() + eos)
    return CausalLMDataset(texts, prompts)


def _fit_text(tokenizer: Any, text: str, budget: int) -> str:
    """``text`` cut to at most ``budget`` tokens (decoded back to a string)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    return tokenizer.decode(ids[: max(budget, 0)])


def classification_prompts(texts: list[str], label_names: list[str], tokenizer: Any, *, max_length: int,
                           chat_template: bool = False) -> tuple[list[str], list[str]]:
    """Prompts and label-word answers for classification as generation.

    Each example's prompt asks for one of ``label_names`` (:data:`CLS_PROMPT_TEMPLATE`, or
    :data:`CLS_CHAT_TEMPLATE` under the tokenizer's chat template when ``chat_template`` and
    the tokenizer has one); the answer of class ``k`` is ``" " + label_names[k]`` (without a
    chat template) or ``label_names[k]``. The text is cut (in tokens) so that prompt and the
    longest answer fit in ``max_length`` tokens: the answer is never truncated away.

    Returns ``(prompts [E], answers [K])``.
    """
    chat = chat_template and has_chat_template(tokenizer)
    choices = ", ".join(label_names)
    answers = [(n if chat else " " + n) for n in label_names]

    def build(text: str) -> str:
        if chat:
            return chat_prompt(tokenizer, CLS_CHAT_TEMPLATE.format(choices=choices, text=text))
        return CLS_PROMPT_TEMPLATE.format(choices=choices, text=text)

    n_answer = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    overhead = len(tokenizer(build(""))["input_ids"])
    budget = max_length - overhead - n_answer - 1
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the text: the prompt template takes "
                         f"{overhead} tokens and the longest label word {n_answer}")
    return [build(_fit_text(tokenizer, t, budget)) for t in texts], answers


class SharedPromptChoices(NamedTuple):
    """Candidates that share their prompt tokens: each prompt once, the answers once.

    Attributes:
      prompt_ids: ``[E, P]`` int32 right-padded prompt tokens (``P`` = the longest prompt).
      prompt_mask: ``[E, P]`` int32, 1 = real token.
      answer_ids: ``[K, A]`` int32 tokens of answer ``k`` (0 after its end).
      answer_mask: ``[K, A]`` float32, 1 = a token of the answer.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    answer_ids: np.ndarray
    answer_mask: np.ndarray


def shared_prompt_choices(choices: TokenizedDataset) -> SharedPromptChoices | None:
    """The :class:`SharedPromptChoices` layout of ``tokenize_choices``' ``[E, K, T]`` arrays, or
    ``None`` when the candidates do not factor that way: when, in some example, the candidates'
    tokens before their answers differ (the tokenizer merged the prompt's end with an answer) or
    an answer's tokens differ from the same answer's tokens in another example, or an answer is
    not the contiguous end of its sequence. Exact: scoring the layout gives the same
    log-likelihoods as scoring every candidate whole."""
    ids, mask, labels = (np.asarray(x) for x in choices)
    if ids.ndim != 3:
        raise ValueError(f"choices must be [E, K, T] arrays, got input_ids of shape {ids.shape}")
    target = labels != IGNORE_INDEX
    if not target.any(-1).all() or not np.array_equal(labels[target], ids[target]):
        return None
    first = target.argmax(-1)                                                  # [E, K]
    lens = mask.sum(-1)                                                        # [E, K]
    pos = np.arange(ids.shape[-1])
    if not np.array_equal(target, (pos >= first[..., None]) & (pos < lens[..., None])):
        return None
    plen = first[:, 0]
    if plen.min() < 1 or not np.array_equal(first, np.broadcast_to(plen[:, None], first.shape)):
        return None
    prompt = np.where(pos < plen[:, None, None], ids, 0)
    if not np.array_equal(prompt, np.broadcast_to(prompt[:, :1], prompt.shape)):
        return None
    alen = lens - first                                                        # [E, K]
    width = int(alen.max())
    offsets = np.arange(width)
    in_answer = offsets < alen[..., None]                                      # [E, K, A]
    idx = np.minimum(first[..., None] + offsets, ids.shape[-1] - 1)
    answers = np.where(in_answer, np.take_along_axis(ids, idx, -1), 0)
    if not (np.array_equal(answers, np.broadcast_to(answers[:1], answers.shape))
            and np.array_equal(in_answer, np.broadcast_to(in_answer[:1], in_answer.shape))):
        return None
    p = int(plen.max())
    prompt_mask = (pos[:p][None] < plen[:, None]).astype(np.int32)
    return SharedPromptChoices(np.where(prompt_mask > 0, ids[:, 0, :p], 0).astype(np.int32), prompt_mask,
                               answers[0].astype(np.int32), in_answer[0].astype(np.float32))


def tokenize_choices(prompts: list[str], answers: list[str], tokenizer: Any, *, max_length: int,
                     cache_dir: str | os.PathLike | None = None) -> TokenizedDataset:
    """Every prompt with every candidate answer: arrays ``[E, K, T]`` (``K = len(answers)``).

    Candidate ``k`` of example ``e`` is ``prompts[e] + answers[k]`` with labels
    :data:`IGNORE_INDEX` except on the answer tokens (the layout :func:`tokenize` gives
    instruction data).
    """
    e, k = len(prompts), len(answers)
    flat = CausalLMDataset([p + a for p in prompts for a in answers], [p for p in prompts for _ in answers])
    tok = tokenize(flat, tokenizer, max_length=max_length, cache_dir=cache_dir)
    return TokenizedDataset(*(x.reshape(e, k, max_length) for x in tok))
