"""The experiment loop: data, model, algorithm, one compiled round per round, eval, metrics,
checkpoints, resume. This is the impure shell around the pure core.

``run_experiment(cfg, out_dir)`` writes::

    <out_dir>/config.json        the resolved config
    <out_dir>/metrics.jsonl      one JSON line per round
    <out_dir>/partition.txt      per-client data summary
    <out_dir>/checkpoints/       orbax checkpoints (see driver/checkpoint.py)
    <out_dir>/summary.json       final summary
    <out_dir>/samples.jsonl      generated samples (``generate_samples > 0``; LM tasks)

Tasks (``cfg.task``): ``classification`` (encoder + head), ``causal_lm`` (decoder, token
NLL / perplexity, per-client perplexity with natural clients) and ``cls_generation`` (label
words scored by a decoder). Only the data, the :class:`Task` and the evaluation differ; the
round, the algorithms, devices and checkpoints are the same code for all three.

Randomness: one seed. Round ``t`` uses ``fold_in(key(seed), t)`` for the round (clients use
``fold_in(round_key, client_id)``) and NumPy ``default_rng([seed, t, ...])`` for sampling,
dropout and batches, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax import data as data_lib
from fedlora_jax import devices as dev_lib
from fedlora_jax import lora as lora_lib
from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.aggregation import round_bytes
from fedlora_jax.algorithms import AlgoContext, RoundReport, build_algorithm
from fedlora_jax.driver import checkpoint as ckpt
from fedlora_jax.driver.config import NATURAL_DATASETS, ExperimentConfig
from fedlora_jax.driver.lock import RunLock
from fedlora_jax.driver.tasks import (
    causal_lm_task,
    classification_task,
    client_accuracies,
    make_choice_evaluate,
    make_evaluate,
    make_lm_evaluate,
    make_shared_prompt_choice_evaluate,
)
from fedlora_jax.federated import (
    ServerState,
    check_population_memory,
    client_start,
    effective_base,
    init_server_state,
    make_round,
    make_spec,
    population_state_bytes,
    round_key,
)
from fedlora_jax.federated import multiprocess as mp
from fedlora_jax.federated.memory import (
    choose_chunk_size,
    cpu_cache_chunk_cap,
    device_memory_bytes,
    estimate_round_memory,
)
from fedlora_jax.models import loading as model_loading
from fedlora_jax.models.common import split_for_round

DEFAULT_CACHE = Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora_jax"))

#: Key streams derived from the experiment seed: ``fold_in(key(seed), stream)``.
LORA_INIT_STREAM = 7
HEAD_INIT_STREAM = 10_000_019
#: NumPy streams ``default_rng([seed, round, stream])``: client sampling, failures, device speed.
SAMPLE_STREAM, DROPOUT_STREAM = 1, 2
#: Key stream of the end-of-run generation samples.
GENERATE_STREAM = 20_000_003


def _log(msg: str, *, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setup:
    """Everything built once per run (host objects, not checkpointed)."""

    cfg: ExperimentConfig
    model: Any
    graphdef: Any
    base: Any
    head0: Any
    targets: dict
    train: Any
    test_batches: dict
    parts: list
    label_names: list
    algo: Any
    ctx: AlgoContext
    model_shape: Any
    device_table: Any
    task: Any
    chunk_size: int = 1
    part_labels: Any = None        # [E] labels behind partitioning / the partition table (None: texts)
    num_groups: int | None = None  # natural clients with their own test texts (per-client LM eval)
    tokenizer: Any = None
    samples: Any = None            # (prompt ids [G, T], prompt mask [G, T], reference texts) or None
    choice_answers: Any = None     # cls_generation with shared prompts: (answer_ids [K, A], answer_mask [K, A])


def _resolve_devices(cfg: ExperimentConfig):
    profiles = []
    for name in cfg.device_mix:
        try:
            profiles.append(dev_lib.get_profile(name))
        except (KeyError, ValueError) as err:
            raise ValueError(f"config field 'device_mix' has unknown device {name!r}; known: "
                             f"{sorted(dev_lib.PROFILES)}") from err
    return profiles


def _model_shape(model, cfg: ExperimentConfig, targets: dict, num_labels: int, *, causal_lm: bool = False):
    mc = model.config
    per_layer = {}
    for t in targets.values():
        per_layer[t.module] = (t.in_features, t.out_features)
    lm = {}
    if causal_lm:  # decoder: LM head over V per token, SwiGLU MLPs for Llama/Qwen2
        lm = dict(causal_lm=True, ffn_matrices=3 if hasattr(mc, "num_kv_heads") else 2)
    return dev_lib.ModelShape(num_layers=mc.num_layers, hidden=mc.hidden_size,
                              intermediate=mc.intermediate_size, heads=mc.num_heads, vocab=mc.vocab_size,
                              seq_len=cfg.max_length, modules=per_layer, num_labels=num_labels, **lm)


def _partition(cfg: ExperimentConfig, labels: np.ndarray, num_clients: int, alpha: float, seed) -> list:
    if cfg.partition == "iid":
        return data_lib.iid_partition(len(labels), num_clients, seed=seed)
    if cfg.partition == "dirichlet":
        return data_lib.dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed)
    if cfg.partition == "shards":
        return data_lib.shard_partition(labels, num_clients, shards_per_client=cfg.shards_per_client, seed=seed)
    return data_lib.quantity_skew_partition(len(labels), num_clients, power=cfg.quantity_power, seed=seed)


def _partition_clients(cfg: ExperimentConfig, labels: np.ndarray) -> tuple[list, np.ndarray]:
    """Client index lists and each client's group (``[K]`` int, all 0 without ``client_groups``).

    With ``client_groups`` (Byun & Lee's data-quality groups) the examples are first split
    IID over the groups in proportion to their sizes, then each group's share is partitioned
    over its clients with the group's own Dirichlet alpha; group ``g``'s clients follow
    group ``g - 1``'s in client order.
    """
    if not cfg.client_groups:
        return _partition(cfg, labels, cfg.num_clients, cfg.dirichlet_alpha, cfg.seed), np.zeros(cfg.num_clients, int)
    sizes = np.array([g[0] for g in cfg.client_groups])
    order = np.random.default_rng([cfg.seed, 0, 4]).permutation(len(labels))
    cuts = np.floor(np.cumsum(sizes) / sizes.sum() * len(labels)).astype(int)[:-1]
    parts, group = [], []
    for g, (idx, (n, alpha, _rank)) in enumerate(zip(np.split(order, cuts), cfg.client_groups, strict=True)):
        idx = np.sort(idx)
        if len(idx) < n:
            raise ValueError(f"config field 'client_groups': group {g} has {n} clients but only {len(idx)} examples")
        sub = data_lib.dirichlet_partition(labels[idx], n, alpha=float(alpha), seed=cfg.seed + 7919 * (g + 1))
        parts += [idx[p] for p in sub]
        group += [g] * n
    return parts, np.asarray(group)


def classification_partition_table(cfg: ExperimentConfig) -> str:
    """The ``partition.txt`` table a labelled-task run of ``cfg`` writes (its clients' label
    histograms), from the data and the partitioning alone (no model, no tokenizer)."""
    if cfg.task == "causal_lm" or cfg.dataset in NATURAL_DATASETS:
        raise ValueError(f"classification_partition_table: task {cfg.task!r} on {cfg.dataset!r} has no labels")
    train_ds, _ = _load_classification(cfg)
    labels = np.asarray(train_ds.labels)
    parts, _ = _partition_clients(cfg, labels)
    names = list(train_ds.label_names)
    return data_lib.partition_table(parts, labels, len(names), label_names=names)


def ranks_by_label_entropy(ranks: np.ndarray, label_hist: np.ndarray) -> np.ndarray:
    """The same ranks ``[K]`` reassigned so the highest go to the clients with the most balanced
    labels: client order by the entropy of its label histogram ``label_hist [K, C]`` (largest
    first, ties by client index) gets the ranks in descending order."""
    hist = np.asarray(label_hist, np.float64)
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    order = np.argsort(-entropy, kind="stable")
    out = np.empty_like(np.asarray(ranks))
    out[order] = np.sort(np.asarray(ranks))[::-1]
    return out


def _client_ranks(cfg: ExperimentConfig, group_of_client: np.ndarray, label_hist: np.ndarray | None
                  ) -> np.ndarray:
    """``[K]`` rank of every client: its group's rank, else ``client_ranks`` round-robin (reordered
    by ``rank_order``), else ``r_max``."""
    if cfg.client_groups:
        return np.array([cfg.client_groups[g][2] for g in group_of_client], np.int32)
    if cfg.client_ranks:
        ranks = np.array([cfg.client_ranks[i % len(cfg.client_ranks)] for i in range(cfg.num_clients)], np.int32)
        if cfg.rank_order == "label_entropy":
            if label_hist is None:
                raise ValueError("config field 'rank_order' = 'label_entropy' needs labelled training data")
            ranks = ranks_by_label_entropy(ranks, label_hist)
        return ranks
    return np.full((cfg.num_clients,), cfg.r_max, np.int32)


def _is_causal_lm(model) -> bool:
    from fedlora_jax.models import GPT2LM, LlamaLM

    return isinstance(model, (LlamaLM, GPT2LM))


class _Data:
    """What a task's data step gives :func:`build_setup` (host NumPy)."""

    def __init__(self, train, test_batches, part_labels, label_names, *, parts=None, num_groups=None,
                 samples_from=None, choice_answers=None):
        self.train, self.test_batches = train, test_batches
        self.part_labels, self.label_names = part_labels, label_names
        self.parts, self.num_groups, self.samples_from = parts, num_groups, samples_from
        self.choice_answers = choice_answers


def _batches_dict(ev) -> dict:
    return {"input_ids": ev.input_ids, "attention_mask": ev.attention_mask, "labels": ev.labels,
            "example_mask": ev.example_mask}


def _load_classification(cfg: ExperimentConfig):
    text_col = cfg.text_column or None
    train_ds = data_lib.load_text_classification(cfg.dataset, split=cfg.train_split, text_column=text_col,
                                                 label_column=cfg.label_column,
                                                 max_examples=cfg.train_limit or None)
    test_ds = data_lib.load_text_classification(cfg.dataset, split=cfg.test_split, text_column=text_col,
                                                label_column=cfg.label_column,
                                                label_names=train_ds.label_names,
                                                max_examples=cfg.test_limit or None)
    return train_ds, test_ds


def _cls_data(cfg, train_ds, test_ds, tokenizer, tok_cache) -> _Data:
    train = data_lib.tokenize(train_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test = data_lib.tokenize(test_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    ev = data_lib.eval_batches(test, cfg.eval_batch_size)
    return _Data(train, _batches_dict(ev), train.labels, list(train_ds.label_names))


def _cls_generation_data(cfg, train_ds, test_ds, tokenizer, tok_cache) -> _Data:
    """Classification as generation: prompt + label word; the loss is on the answer only, the
    evaluation scores every label word: from one cached pass of each prompt when the candidates
    share their prompt tokens (``shared_prompt_choices``, the usual case), else every candidate
    whole (``make_choice_evaluate``); the two give the same scores (tested)."""
    from fedlora_jax.data import tokenization as tok_lib

    names = list(train_ds.label_names)
    kw = dict(max_length=cfg.max_length, chat_template=cfg.chat_template)
    prompts, answers = tok_lib.classification_prompts(train_ds.texts, names, tokenizer, **kw)
    train_lm = data_lib.CausalLMDataset([p + answers[y] for p, y in zip(prompts, train_ds.labels, strict=True)],
                                        prompts)
    train = data_lib.tokenize(train_lm, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test_prompts, _ = tok_lib.classification_prompts(test_ds.texts, names, tokenizer, **kw)
    choices = tok_lib.tokenize_choices(test_prompts, answers, tokenizer, max_length=cfg.max_length,
                                       cache_dir=tok_cache)
    # Candidates sharing their prompt tokens are scored from one cached prompt pass (exact, fewer tokens).
    shared = tok_lib.shared_prompt_choices(choices)
    if shared is None:
        ev, choice_answers = data_lib.eval_batches(choices, cfg.eval_batch_size), None
    else:
        prompts_only = data_lib.TokenizedDataset(shared.prompt_ids, shared.prompt_mask, shared.prompt_ids)
        ev, choice_answers = data_lib.eval_batches(prompts_only, cfg.eval_batch_size), shared[2:]
    labels = np.asarray(test_ds.labels, np.int32)
    rows = np.zeros(ev.example_mask.size, np.int64)
    rows[: len(labels)] = np.arange(len(labels))
    batches = _batches_dict(ev)
    batches["class_labels"] = labels[rows].reshape(ev.example_mask.shape)
    true = data_lib.TokenizedDataset(*(x[np.arange(len(labels)), labels] for x in choices))
    return _Data(train, batches, train_ds.labels, names, samples_from=true, choice_answers=choice_answers)


def _natural_clients(cfg: ExperimentConfig):
    try:
        from fedlora_jax.data import shakespeare
    except ImportError as err:
        raise ValueError("dataset='shakespeare' needs fedlora_jax.data.shakespeare, which is not installed") from err
    clients = shakespeare.load_role_clients(min_lines=cfg.natural_min_lines, seed=cfg.seed,
                                            max_clients=cfg.num_clients if cfg.partition == "natural" else None)
    if cfg.partition == "natural" and len(clients) < cfg.num_clients:
        raise ValueError(f"config field 'num_clients' = {cfg.num_clients} exceeds the {len(clients)} Shakespeare "
                         f"roles with >= natural_min_lines={cfg.natural_min_lines} lines")
    return shakespeare, clients


def _causal_lm_data(cfg, tokenizer, tok_cache) -> _Data:
    from fedlora_jax.data import tokenization as tok_lib

    parts = num_groups = None
    test_group = None
    if cfg.dataset == "shakespeare":
        shakespeare, clients = _natural_clients(cfg)
        train_ds, train_client = shakespeare.to_causal_lm(clients, "train")
        if cfg.natural_test_per_client:
            clients = [c._replace(test=c.test[: cfg.natural_test_per_client]) for c in clients]
        test_ds, test_client = shakespeare.to_causal_lm(clients, "test")
        if cfg.partition == "natural":
            train_client = np.asarray(train_client)
            parts = [np.flatnonzero(train_client == c) for c in range(cfg.num_clients)]
            num_groups, test_group = cfg.num_clients, np.asarray(test_client, np.int32)
        if cfg.train_limit and cfg.partition != "natural":
            train_ds = train_ds.select(np.arange(min(cfg.train_limit, len(train_ds.texts))))
        if cfg.test_limit:
            n = min(cfg.test_limit, len(test_ds.texts))
            test_ds = test_ds.select(np.arange(n))
            test_group = None if test_group is None else test_group[:n]
    else:
        text_col = cfg.text_column or None
        train_ds = data_lib.load_causal_lm(cfg.dataset, split=cfg.train_split, text_column=text_col,
                                           max_examples=cfg.train_limit or None)
        test_ds = data_lib.load_causal_lm(cfg.dataset, split=cfg.test_split, text_column=text_col,
                                          max_examples=cfg.test_limit or None)
    if cfg.lm_loss == "all":
        train_ds, test_ds = (data_lib.CausalLMDataset(d.texts, None) for d in (train_ds, test_ds))
    elif cfg.chat_template:
        train_ds, test_ds = (tok_lib.apply_chat_template(d, tokenizer) for d in (train_ds, test_ds))
    train = data_lib.tokenize(train_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test = data_lib.tokenize(test_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    ev = data_lib.eval_batches(test, cfg.eval_batch_size)
    batches = _batches_dict(ev)
    if test_group is not None:
        rows = np.zeros(ev.example_mask.size, np.int64)
        rows[: len(test_group)] = np.arange(len(test_group))
        batches["group"] = test_group[rows].reshape(ev.example_mask.shape)
    return _Data(train, batches, None, ["text"], parts=parts, num_groups=num_groups, samples_from=test)


def sample_rows(num_examples: int, n: int) -> np.ndarray:
    """``[min(n, num_examples)]`` row indices evenly spaced over ``0 .. num_examples - 1`` (the
    first and the last included): test sets in client order (natural clients) give prompts from
    many clients, not the first few."""
    n = min(n, num_examples)
    return np.unique(np.linspace(0, num_examples - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def _sample_prompts(tok, n: int):
    """``n`` examples of ``tok`` (:func:`sample_rows`) as generation prompts: the prompt tokens
    (those before the first target) of instruction data, else the first half of the text.
    Returns ``(ids [G, T], mask [G, T], prompt_lens [G], lens [G], rows [G])``."""
    rows = sample_rows(tok.num_examples, n)
    ids, mask, labels = (np.asarray(x)[rows] for x in tok)
    lens = mask.sum(-1)
    target = labels != data_lib.IGNORE_INDEX
    first = np.where(target.any(-1), target.argmax(-1), lens)
    plen = np.where(first > 0, first, np.maximum(lens // 2, 1)).clip(1, None)
    pmask = (np.arange(ids.shape[1])[None] < plen[:, None]).astype(np.int32)
    return np.where(pmask > 0, ids, 0).astype(np.int32), pmask, plen, lens, rows


def build_setup(cfg: ExperimentConfig, *, quiet: bool = False, cache_dir: Path | None = None) -> Setup:
    """Load data and model, partition, build the algorithm. Raises clear errors on bad input
    before anything is compiled."""
    cache_dir = DEFAULT_CACHE if cache_dir is None else Path(cache_dir)
    t0 = time.time()
    train_ds = test_ds = None
    num_labels = None
    if cfg.task in ("classification", "cls_generation"):
        train_ds, test_ds = _load_classification(cfg)
        num_labels = len(train_ds.label_names)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = model_loading.from_pretrained(cfg.model, num_labels=num_labels if cfg.task == "classification" else None,
                                          dtype=dtype,
                                          key=jax.random.fold_in(jax.random.key(cfg.seed), HEAD_INIT_STREAM),
                                          norm_barrier=cfg.norm_barrier, merged_lora=cfg.merged_lora)
    lm = _is_causal_lm(model)
    if cfg.task == "classification" and lm:
        raise ValueError(f"config field 'task' = 'classification' needs an encoder classifier, but model "
                         f"{cfg.model!r} is a causal LM ({type(model).__name__}); use task='cls_generation' or "
                         "'causal_lm'")
    if cfg.task != "classification" and not lm:
        raise ValueError(f"config field 'task' = {cfg.task!r} needs a causal LM with an LM head (Llama, Qwen2, "
                         f"GPT-2), but model {cfg.model!r} is a {type(model).__name__}")
    max_pos = getattr(model.config, "max_len", getattr(model.config, "max_position_embeddings", None))
    if max_pos is not None and cfg.max_length > max_pos:
        raise ValueError(f"config field 'max_length' = {cfg.max_length} exceeds the model's maximum "
                         f"sequence length {max_pos}")
    if cfg.generate_samples and max_pos is not None and cfg.max_length + cfg.generate_max_new_tokens > max_pos:
        raise ValueError(f"config fields 'max_length' + 'generate_max_new_tokens' = {cfg.max_length} + "
                         f"{cfg.generate_max_new_tokens} exceed the model's {max_pos} positions")
    # load_tokenizer resolves the name itself: a GGUF model (SmolLM2) has no config.json folder.
    tokenizer = model_loading.load_tokenizer(cfg.model)
    tok_cache = cache_dir / "tokens"
    if cfg.task == "classification":
        data = _cls_data(cfg, train_ds, test_ds, tokenizer, tok_cache)
    elif cfg.task == "cls_generation":
        data = _cls_generation_data(cfg, train_ds, test_ds, tokenizer, tok_cache)
    else:
        data = _causal_lm_data(cfg, tokenizer, tok_cache)
    train = data.train
    n_train = train.num_examples
    if lm and not np.any(train.labels[:, 1:] != data_lib.IGNORE_INDEX):
        raise ValueError(f"no training example has a target token within max_length={cfg.max_length} tokens "
                         "(every token is prompt or padding); raise 'max_length'")
    if cfg.num_clients > n_train:
        raise ValueError(f"config field 'num_clients' = {cfg.num_clients} exceeds the {n_train} "
                         "training examples")
    if data.parts is not None:
        parts, group_of_client = data.parts, np.zeros(cfg.num_clients, int)
        empty = [c for c, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ValueError(f"natural clients {empty[:5]} have no training texts")
    else:
        labels = data.part_labels if data.part_labels is not None else np.zeros(n_train, np.int64)
        parts, group_of_client = _partition_clients(cfg, labels)
    targets = model.adapter_targets(list(cfg.target_modules))
    for t in targets.values():
        if cfg.r_max > min(t.in_features, t.out_features):
            raise ValueError(f"config field 'r_max' = {cfg.r_max} exceeds the dimensions of module "
                             f"{t.module!r} ({t.in_features} x {t.out_features})")
    graphdef, base, head0 = split_for_round(model)
    keys = tuple(sorted(targets))
    label_hist = None if cfg.rank_order == "given" or data.part_labels is None else data_lib.label_histograms(
        parts, data.part_labels, len(data.label_names))
    ranks = _client_ranks(cfg, group_of_client, label_hist)
    missing = sorted(set(cfg.eval_distributed_ranks) - set(ranks.tolist()))
    if missing:
        raise ValueError(f"config field 'eval_distributed_ranks' = {cfg.eval_distributed_ranks}: no client has "
                         f"rank {missing} (the clients' ranks are {sorted(set(ranks.tolist()))})")
    profiles = _resolve_devices(cfg)
    client_devices = np.array([i % len(profiles) for i in range(cfg.num_clients)], np.int32)
    shape = _model_shape(model, cfg, targets, num_labels or 2, causal_lm=lm)
    ctx = AlgoContext(keys=keys, layer_of_key={k: targets[k].layer for k in keys},
                      num_layers=model.config.num_layers, r_max=cfg.r_max, client_ranks=ranks,
                      client_devices=client_devices, rounds=cfg.rounds, scale=cfg.scale,
                      aggregator_options=dict(cfg.aggregator_options), seed=cfg.seed,
                      device_profiles=tuple(profiles), model_shape=shape, batch_size=cfg.batch_size,
                      local_steps=cfg.local_steps, deadline_s=cfg.deadline_s or None)
    algo = build_algorithm(cfg.algorithm, ctx, **cfg.algo)
    _check_engine_fields(cfg, algo, model.config.num_layers)
    if lm:
        task = causal_lm_task(graphdef, scale=cfg.scale, remat=cfg.remat)
    else:
        task = classification_task(graphdef, scale=cfg.scale, remat=cfg.remat)
    chunk_size = _fit_chunk_size(cfg, model, targets)
    samples = None
    if cfg.generate_samples:
        from fedlora_jax.models.generate import supports_generation

        if not supports_generation(model):
            raise ValueError(f"config field 'generate_samples' = {cfg.generate_samples}: {type(model).__name__} "
                             "has no cached generation path")
        samples = _sample_prompts(data.samples_from, cfg.generate_samples) + (data.samples_from,)
    n_test = int(np.sum(data.test_batches["example_mask"]))
    targets_s = (f"{len(data.label_names)} labels" if cfg.task != "causal_lm"
                 else f"next-token targets over a {model.config.vocab_size}-token vocabulary")
    _log(f"setup: task {cfg.task}, {n_train} train / {n_test} test examples, "
         f"{targets_s}, {len(keys)} adapted modules, "
         f"{time.time() - t0:.1f}s", quiet=quiet)
    return Setup(cfg, model, graphdef, base, head0, targets, train, data.test_batches, parts,
                 list(data.label_names), algo, ctx, shape, dev_lib.stack_profiles(profiles),
                 task, chunk_size, part_labels=data.part_labels, num_groups=data.num_groups,
                 tokenizer=tokenizer, samples=samples, choice_answers=data.choice_answers)


def _check_engine_fields(cfg: ExperimentConfig, algo, num_layers: int) -> None:
    """``cut_variants`` inside the model and not with a per-cut algorithm; host client state
    not with several processes."""
    bad = [v for v in cfg.cut_variants if v >= num_layers]
    if bad:
        raise ValueError(f"config field 'cut_variants' = {cfg.cut_variants}: cuts {bad} are not layers of the "
                         f"model (0 .. {num_layers - 1})")
    if cfg.cut_variants and algo.static_cut:
        raise ValueError(f"config field 'cut_variants' = {cfg.cut_variants} cannot be combined with algorithm "
                         f"{algo.name!r}'s static_cut (one compiled round per cut); drop one of them")
    if cfg.client_state == "host" and jax.process_count() > 1:
        raise ValueError("config field 'client_state' = 'host' is not supported with several processes yet "
                         "(each process would hold its own copy); use 'device'")


def _fit_chunk_size(cfg: ExperimentConfig, model, targets: dict) -> int:
    """The largest chunk <= cfg.chunk_size whose estimated round memory fits the device
    (federated.memory); a clear error naming what to change if even one client does not fit.
    On the CPU backend the chunk is also capped by :func:`cpu_cache_chunk_cap` (wider ``vmap``
    chunks measured slower there)."""
    requested = min(cfg.chunk_size, cfg.clients_per_round)
    dtype_bytes = 2 if cfg.dtype == "bfloat16" else 4
    if jax.default_backend() == "cpu":
        width = max(model.config.hidden_size, model.config.intermediate_size)
        requested = min(requested, cpu_cache_chunk_cap(cfg.batch_size, cfg.max_length, width,
                                                       itemsize=dtype_bytes))
    estimate = lambda k: estimate_round_memory(
        model.config, chunk_size=k, batch=cfg.batch_size, seq_len=cfg.max_length, r_max=cfg.r_max,
        n_adapters=len(targets), dtype_bytes=dtype_bytes, steps=cfg.local_steps,
        remat=cfg.remat,
        num_clients=cfg.clients_per_round,
        adapter_dims_sum=sum(t.in_features + t.out_features for t in targets.values()))
    return _fit_processes(cfg, choose_chunk_size(requested, estimate, device_memory_bytes()))


def _fit_processes(cfg: ExperimentConfig, chunk_size: int) -> int:
    """Several processes: the round's clients and each chunk split over every device of every
    process (the mesh's ``"clients"`` axis), so ``clients_per_round`` must be a multiple of the
    device count and the chunk is rounded down to one (at least the device count)."""
    if jax.process_count() == 1:
        return chunk_size
    n = jax.device_count()
    if cfg.clients_per_round % n:
        raise ValueError(f"config field 'clients_per_round' = {cfg.clients_per_round} must be a multiple of the "
                         f"{n} devices of this {jax.process_count()}-process run (the mesh's 'clients' axis)")
    return max(n, chunk_size // n * n)


def init_state(setup: Setup) -> ServerState:
    cfg = setup.cfg
    shapes = {k: (t.in_features, t.out_features) for k, t in setup.targets.items()}
    lora0 = lora_lib.init(jax.random.fold_in(jax.random.key(cfg.seed), LORA_INIT_STREAM), shapes, cfg.r_max,
                          scheme=setup.algo.init_scheme)
    check_population_memory(population_state_bytes(setup.algo, lora0, cfg.num_clients), num_clients=cfg.num_clients,
                            on_host=cfg.client_state == "host")
    return init_server_state(lora0, setup.head0, setup.algo, num_clients=cfg.num_clients,
                             client_state_on_host=cfg.client_state == "host")


def sample_clients(cfg: ExperimentConfig, round_idx: int) -> np.ndarray:
    """Clients of round ``round_idx``: uniform without replacement, sorted, from
    ``default_rng([seed, round, 1])``."""
    rng = np.random.default_rng([cfg.seed, round_idx, SAMPLE_STREAM])
    return np.sort(rng.choice(cfg.num_clients, size=cfg.clients_per_round, replace=False)).astype(np.int32)


def _batches_for(setup: Setup, client_ids: np.ndarray, round_idx: int):
    """``(batch, num_steps [C], num_examples [C])`` of a round's clients. Several processes: the
    batch holds only this process's clients (:func:`~fedlora_jax.federated.multiprocess.local_client_range`),
    the counts cover every client (the spec is global)."""
    cfg = setup.cfg
    c = len(client_ids)
    lo, hi = (0, c) if jax.process_count() == 1 else mp.local_client_range(c, mp.global_client_mesh())
    cb = data_lib.make_client_batches(setup.train, setup.parts, client_ids[lo:hi], steps=cfg.local_steps,
                                      batch_size=cfg.batch_size, seed=cfg.seed, round_idx=round_idx,
                                      policy=cfg.batch_policy)
    batch = {"input_ids": cb.input_ids, "attention_mask": cb.attention_mask, "labels": cb.labels,
             "example_mask": cb.example_mask}
    if (lo, hi) == (0, c):
        return batch, cb.num_steps, cb.num_examples
    num_steps = np.array([data_lib.client_example_order(
        np.asarray(setup.parts[i]), steps=cfg.local_steps, batch_size=cfg.batch_size, policy=cfg.batch_policy,
        rng=data_lib.client_rng(cfg.seed, round_idx, int(i)))[2] for i in client_ids], np.int32)
    num_examples = np.array([len(setup.parts[i]) for i in client_ids], np.int32)
    return batch, num_steps, num_examples


def simulate_devices(setup: Setup, spec, client_ids: np.ndarray, round_idx: int, bytes_up, bytes_down):
    """The device stage of a round: FLOPs from the cost model, the times the devices take at
    their *true* speed (``devices.true_speed_factor``: drift and noise per client, seeded),
    energy, and the :class:`RoundReport` an algorithm may learn from.

    Returns ``(flops [C], times: MeasuredTimes, energy [C], report)``.
    """
    cfg = setup.cfg
    ranks = dev_lib.ranks_from_masks({k: np.asarray(v) for k, v in spec.update_masks.items()}, setup.model_shape)
    per_step = dev_lib.client_flops(np.asarray(ranks), np.asarray(spec.grad_cut), setup.model_shape,
                                    batch=cfg.batch_size, steps=1)
    flops = np.asarray(per_step, np.float64) * np.asarray(spec.num_steps, np.float64)
    device_ids = setup.ctx.client_devices[client_ids]
    devs = dev_lib.take_devices(setup.device_table, device_ids)
    speed = dev_lib.true_speed_factor(client_ids, round_idx, seed=cfg.seed, drift=cfg.device_drift,
                                      noise=cfg.device_noise, tag=0)
    link = dev_lib.true_speed_factor(client_ids, round_idx, seed=cfg.seed, drift=cfg.device_drift,
                                     noise=cfg.device_noise, tag=1)
    times = dev_lib.measure_round(flops, bytes_up, bytes_down, devs, speed, link_factors=link)
    energy = np.asarray(dev_lib.client_energy(dev_lib.ClientTime(times.compute_s, times.up_s + times.down_s,
                                                                 times.total_s), devs), np.float64)
    report = RoundReport(np.asarray(client_ids), np.asarray(device_ids), np.asarray(spec.weight) > 0, flops,
                         times.compute_s, np.asarray(bytes_up), times.up_s, np.asarray(bytes_down), times.down_s)
    return flops, times, energy, report


def make_round_fn(setup: Setup, static_grad_cut: int | None = None):
    cfg = setup.cfg
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    mesh = mp.global_client_mesh() if jax.process_count() > 1 else None
    round_fn = make_round(setup.task, setup.algo, optimizer=opt, chunk_size=setup.chunk_size,
                          static_grad_cut=static_grad_cut, return_client_models=cfg.diagnose_first_round, mesh=mesh,
                          cut_variants=cfg.cut_variants or None, client_state_on_host=cfg.client_state == "host")
    # Several processes: each passes its own clients' batches; state and metrics come back to the host.
    return round_fn if mesh is None else mp.DistributedRound(round_fn, mesh)


def first_round_diagnostic(setup: Setup, before: ServerState, after: ServerState, spec, metrics, evaluate,
                           test_batches) -> dict | None:
    """Test accuracy of the highest-rank participating client's own model just before the
    aggregation and of the model it receives just after (Byun & Lee's dilution diagnostic).

    Returns ``{"client", "rank", "local_accuracy", "after_aggregation_accuracy"}`` or ``None``
    when no client took part.
    """
    weights = np.asarray(metrics["client_weight"])
    if not np.any(weights > 0):
        return None
    ranks = np.stack([np.asarray(v).sum(-1) for v in spec.update_masks.values()]).max(0)
    pos = int(np.argmax(np.where(weights > 0, ranks, -1)))
    masks = {k: jnp.asarray(v[pos]) for k, v in spec.masks.items()}
    own_lora = jax.tree.map(lambda x: x[pos], metrics["client_lora"])
    own_head = jax.tree.map(lambda x: x[pos], metrics["client_head"])
    base_before = effective_base(setup.task, setup.base, before.agg_state)
    local = evaluate(base_before, own_head, own_lora, masks, test_batches)[0]
    received = client_start(setup.algo, after, masks, int(spec.client_id[pos]))
    base_after = effective_base(setup.task, setup.base, after.agg_state)
    merged = evaluate(base_after, after.head, received, masks, test_batches)[0]
    return {"client": int(spec.client_id[pos]), "rank": int(ranks[pos]), "local_accuracy": float(local),
            "after_aggregation_accuracy": float(merged)}


def global_slot_norms(lora) -> list[float]:
    """``[R]``: per rank slot ``i``, the sum over modules of ``|e_i| ||a[:, i]|| ||b[i, :]||`` (the
    norm of the slot's rank-1 component; how much each slot of the global adapter carries)."""
    total = 0.0
    for f in lora.values():
        norm = jnp.linalg.norm(f.a, axis=0) * jnp.linalg.norm(f.b, axis=1)
        total = total + (norm if f.e is None else norm * jnp.abs(f.e))
    return np.asarray(total, np.float64).round(6).tolist()


def distributed_accuracies(setup: Setup, state: ServerState, evaluate, test_batches) -> dict[str, float]:
    """``{rank: accuracy}`` of the model a client of each of ``cfg.eval_distributed_ranks``
    receives from ``state``: the algorithm's plan and distribute for the population's first
    client of that rank (HAFL's "degradation at distribution")."""
    out = {}
    base = effective_base(setup.task, setup.base, state.agg_state)
    for rank in setup.cfg.eval_distributed_ranks:
        cid = int(np.flatnonzero(setup.ctx.client_ranks == rank)[0])
        plan = setup.algo.plan(state, np.array([cid]), int(state.round))
        masks = {k: jnp.asarray(v[0]) for k, v in plan.masks.items()}
        received = client_start(setup.algo, state, masks, cid)
        out[str(rank)] = float(evaluate(base, state.head, received, masks, test_batches)[0])
    return out


def _spec(setup: Setup, plan, client_ids, num_steps, weights):
    return make_spec(plan.masks, update_masks=plan.update_masks, num_steps=num_steps, weight=weights,
                     client_id=client_ids, num_layers=setup.ctx.num_layers, depth_mask=plan.depth_mask,
                     device_id=setup.ctx.client_devices[client_ids], layer_of_key=setup.ctx.layer_of_key,
                     global_masks=plan.global_masks)


def eval_masks(setup: Setup, state: ServerState):
    """Masks of the global model at evaluation (the algorithm's, e.g. FedARA's ``z``), or ``None``."""
    m = setup.algo.eval_masks(state.algo)
    return None if m is None else {k: jnp.asarray(v) for k, v in m.items()}


def evaluate_global(setup: Setup, state: ServerState, evaluate, test_batches):
    """``evaluate(...)`` of the global model: the base with any folded update, the global head
    and adapter under :func:`eval_masks`."""
    base = effective_base(setup.task, setup.base, state.agg_state)
    return evaluate(base, state.head, state.lora, eval_masks(setup, state), test_batches)


def _spread(values) -> dict:
    """``{"mean", "min", "p10", "p50", "p90", "max"}`` of the finite entries of ``values``."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "p10": float(np.percentile(v, 10)),
            "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "max": float(np.max(v))}


def make_evaluator(setup: Setup):
    """``(evaluate, evaluate_state)``: the task's jitted evaluation (``evaluate(base, head, lora,
    masks, batches)``) and ``evaluate_state(state) -> dict`` of the metrics a round logs.

    Classification and classification as generation: ``test_accuracy``, ``test_loss``,
    ``test_class_accuracy`` (``[num_classes]``, ``None`` for a class absent from the test set)
    and ``client_test_accuracy`` (each client's accuracy under its label histogram). Causal LM:
    ``test_loss`` (mean token NLL), ``test_perplexity``, ``test_token_accuracy`` and, with
    natural clients, ``client_test_perplexity`` / ``client_test_token_accuracy`` (mean, min,
    percentiles over the clients, each on its own test texts).
    """
    cfg = setup.cfg
    test_batches = jax.tree.map(jnp.asarray, setup.test_batches)
    if cfg.task == "causal_lm":
        evaluate = make_lm_evaluate(setup.graphdef, scale=cfg.scale, num_groups=setup.num_groups)

        def evaluate_state(st) -> dict:
            res = evaluate_global(setup, st, evaluate, test_batches)
            out = {"test_loss": float(res["nll"]), "test_perplexity": float(res["perplexity"]),
                   "test_token_accuracy": float(res["accuracy"])}
            if setup.num_groups is not None:
                out["client_test_perplexity"] = _spread(res["group_perplexity"])
                out["client_test_token_accuracy"] = _spread(res["group_accuracy"])
            return out

        return evaluate, evaluate_state
    n_cls = len(setup.label_names)
    if cfg.task == "cls_generation" and setup.choice_answers is not None:
        evaluate = make_shared_prompt_choice_evaluate(setup.graphdef, scale=cfg.scale, num_classes=n_cls,
                                                      answer_ids=setup.choice_answers[0],
                                                      answer_mask=setup.choice_answers[1])
    elif cfg.task == "cls_generation":
        evaluate = make_choice_evaluate(setup.graphdef, scale=cfg.scale, num_classes=n_cls)
    else:
        evaluate = make_evaluate(setup.graphdef, scale=cfg.scale, num_classes=n_cls)
    label_hist = data_lib.label_histograms(setup.parts, setup.part_labels, n_cls)

    def evaluate_state(st) -> dict:
        acc, loss, per_class = evaluate_global(setup, st, evaluate, test_batches)
        ca = client_accuracies(per_class, label_hist)
        return {"test_accuracy": float(acc), "test_loss": float(loss),
                "test_class_accuracy": [float(a) if np.isfinite(a) else None for a in np.asarray(per_class)],
                "client_test_accuracy": {"mean": float(np.mean(ca)), "min": float(np.min(ca)),
                                         "p10": float(np.percentile(ca, 10)), "max": float(np.max(ca))}}

    return evaluate, evaluate_state


def generate_samples(setup: Setup, state: ServerState) -> list[dict]:
    """Generate from the sample prompts with the global model (one jit): a list of
    ``{"prompt", "generated", "reference"}`` texts."""
    from fedlora_jax.models.generate import make_generate

    cfg = setup.cfg
    ids, mask, plen, lens, rows, tok = setup.samples
    tokenizer = setup.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    gen = make_generate(setup.graphdef, max_new_tokens=cfg.generate_max_new_tokens,
                        temperature=float(cfg.generate_temperature), eos_id=None if eos is None else int(eos),
                        pad_id=0 if pad is None else int(pad))
    base = effective_base(setup.task, setup.base, state.agg_state)
    key = jax.random.fold_in(jax.random.key(cfg.seed), GENERATE_STREAM)
    out = gen(base, state.head, jnp.asarray(ids), jnp.asarray(mask), key=key, lora=state.lora,
              masks=eval_masks(setup, state), scale=cfg.scale)
    tokens, n_gen = np.asarray(out.tokens), np.asarray(out.lengths)
    full = np.asarray(tok.input_ids)[rows]
    group = setup.test_batches.get("group")
    client = None if group is None else np.asarray(group).reshape(-1)[rows]
    dec = lambda x: tokenizer.decode([int(t) for t in x], skip_special_tokens=True)
    return [{"prompt": dec(ids[g, : plen[g]]), "generated": dec(tokens[g, : n_gen[g]]),
             "reference": dec(full[g, plen[g]: lens[g]]),
             **({} if client is None else {"client": int(client[g])})} for g in range(len(ids))]


def _jsonable_option(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)


def _json_round(x):
    if isinstance(x, float):
        return round(x, 6)
    return x


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                   stop_after: int | None = None, cache_dir: Path | None = None) -> dict:
    """Run (or resume) an experiment. Returns the summary dict.

    Args:
      cfg: the experiment config.
      out_dir: run directory (created).
      resume: continue from the last checkpoint in ``out_dir`` (refused if the config differs).
      quiet: no progress output.
      stop_after: stop after this many rounds in this call (testing / preemption drills).
      cache_dir: tokenization cache (default ``~/.cache/fedlora_jax``).

    ``out_dir`` is locked (:class:`~fedlora_jax.driver.lock.RunLock`) from before anything is
    written to it until this returns or raises: a second run on it raises ``RunLockedError``.

    Several JAX processes (:mod:`fedlora_jax.federated.multiprocess`, ``fedlora train
    --num-processes``): every process calls this with the same config and samples the same
    clients; each builds only its own clients' batches; process 0 locks ``out_dir`` and writes
    everything, the others only read it (the checkpoint, on resume).
    """
    out = Path(out_dir)
    if resume and not out.is_dir():  # nothing to lock, and nothing is created
        _refuse_resume(out)
    if not mp.is_primary():  # several processes: process 0 locks and writes, the others only read
        return _run_locked(cfg, out, resume=resume, quiet=True, stop_after=stop_after, cache_dir=cache_dir)
    with RunLock(out) as lock:
        if lock.took_over is not None:
            _log(f"took over the stale lock of {out} ({lock.stale_reason})", quiet=quiet)
        return _run_locked(cfg, out, resume=resume, quiet=quiet, stop_after=stop_after, cache_dir=cache_dir)


def _run_locked(cfg: ExperimentConfig, out: Path, *, resume: bool, quiet: bool, stop_after: int | None,
                cache_dir: Path | None) -> dict:
    """The body of :func:`run_experiment`, run while ``out`` is locked."""
    metrics_path = out / "metrics.jsonl"
    ckpt_dir = out / "checkpoints"
    if resume and ckpt.latest_round(ckpt_dir) is None:  # checked under the lock: a running run is refused first
        _refuse_resume(out)
    if not resume and (ckpt.latest_round(ckpt_dir) is not None or metrics_path.exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or use a new "
                              "output directory")
    _sync_processes(ckpt_dir)
    setup = build_setup(cfg, quiet=quiet, cache_dir=cache_dir)
    if mp.is_primary():
        ckpt.write_json_atomic(out / "config.json", cfg.to_dict())
        part_labels = setup.part_labels if setup.part_labels is not None else np.zeros(setup.train.num_examples, int)
        (out / "partition.txt").write_text(data_lib.partition_table(
            setup.parts, part_labels, len(setup.label_names), label_names=setup.label_names) + "\n")
    state = init_state(setup)
    start = 0
    cumulative = {"bytes_up": 0.0, "bytes_down": 0.0, "sim_time_s": 0.0, "energy_j": 0.0}
    if resume and ckpt.latest_round(ckpt_dir) is not None:
        last, state, meta = ckpt.restore(ckpt_dir, state, fingerprint=cfg.fingerprint())
        start = last + 1
        cumulative = meta.get("cumulative", cumulative)
        _truncate_metrics(metrics_path, start)
        _log(f"resumed from round {last} ({ckpt_dir})", quiet=quiet)
    round_fns: dict = {}

    def round_fn_for(spec):
        """One compiled round, or one per static gradient cut (``Algorithm.static_cut``)."""
        k = int(np.min(spec.grad_cut)) if setup.algo.static_cut else None
        if k not in round_fns:
            round_fns[k] = make_round_fn(setup, static_grad_cut=k)
        return round_fns[k]

    evaluate, evaluate_state = make_evaluator(setup)
    test_batches = jax.tree.map(jnp.asarray, setup.test_batches)

    if start == 0:
        ev0 = {k: v for k, v in evaluate_state(state).items() if not k.startswith("client_")}
        _log(f"before training: {_headline(ev0)}", quiet=quiet)
        _append_jsonl(metrics_path, {"round": -1, **ev0})
    t_run = time.time()
    rounds_done = 0

    def round_inputs():
        # Host-side batch building runs in a background thread, one round ahead (double buffer).
        for rr in range(start, cfg.rounds):
            ids_r = sample_clients(cfg, rr)
            yield (ids_r, *_batches_for(setup, ids_r, rr))

    prefetch = data_lib.Prefetcher(round_inputs(), depth=2)
    try:
        for r in range(start, cfg.rounds):
            t0 = time.time()
            ids, batch, num_steps, num_examples = next(prefetch)
            plan = setup.algo.plan(state, ids, r)
            rng = np.random.default_rng([cfg.seed, r, DROPOUT_STREAM])
            dropped = rng.random(len(ids)) < cfg.dropout_prob
            weights = np.where(dropped, 0.0, num_examples.astype(np.float32))
            spec = _spec(setup, plan, ids, num_steps, weights)
            bytes_up, bytes_down = round_bytes(setup.algo.aggregator, state.lora, state.head, spec.update_masks,
                                               spec.masks)
            flops, times, energy, report = simulate_devices(setup, spec, ids, r, bytes_up, bytes_down)
            round_s, kept = dev_lib.round_time(np.asarray(times.total_s), cfg.deadline_s or None, valid=weights > 0)
            stragglers = (weights > 0) & ~np.asarray(kept)
            weights = np.where(stragglers, 0.0, weights)
            spec = spec._replace(weight=weights.astype(np.float32))
            before = state
            state, m = round_fn_for(spec)(state, batch, spec, round_key(cfg.seed, r), setup.base)
            diagnostic = None
            if cfg.diagnose_first_round and r == 0:
                diagnostic = first_round_diagnostic(setup, before, state, spec, m, evaluate, test_batches)
            participated = np.asarray(m["client_weight"]) > 0
            if setup.algo.observe is not None:
                state = state._replace(algo=setup.algo.observe(state.algo, report._replace(participated=participated)))
            cumulative["bytes_up"] += float(np.sum(bytes_up[participated]))
            cumulative["bytes_down"] += float(np.sum(bytes_down))
            cumulative["sim_time_s"] += float(round_s)
            cumulative["energy_j"] += float(np.sum(energy))
            line = {
                "round": r,
                "clients": ids.tolist(),
                "client_device": [setup.ctx.device_profiles[d].name for d in setup.ctx.client_devices[ids]],
                "train_loss": float(m["train_loss"]),
                "train_accuracy": float(m["train_accuracy"]),
                "client_loss": np.asarray(m["client_loss"]).round(6).tolist(),
                "client_update_norm": np.asarray(m["client_update_norm"]).round(6).tolist(),
                "dropped_nonfinite": int(m["num_dropped_nonfinite"]),
                "dropped_failure": int(np.sum(dropped)),
                "dropped_deadline": int(np.sum(stragglers)),
                "bytes_up": float(np.sum(bytes_up[participated])),
                "bytes_down": float(np.sum(bytes_down)),
                "client_bytes_up": bytes_up.tolist(),
                "client_bytes_down": bytes_down.tolist(),
                "sim_round_time_s": float(round_s),
                "sim_energy_j": float(np.sum(energy)),
                "client_sim_time_s": np.asarray(times.total_s).round(6).tolist(),
                "client_flops": flops.tolist(),
                "active_ranks": {k: np.asarray(v).sum(-1).tolist() for k, v in spec.update_masks.items()},
                "grad_cut": np.asarray(spec.grad_cut).tolist(),
                **{f"cum_{k}": v for k, v in cumulative.items()},
            }
            if diagnostic is not None:
                line["first_round_diagnostic"] = diagnostic
            global_masks = setup.algo.eval_masks(state.algo)
            if global_masks is not None:
                line["global_ranks"] = {k: int(np.asarray(v).sum()) for k, v in global_masks.items()}
            if (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1:
                line.update(evaluate_state(state))
                if cfg.task != "causal_lm":
                    line["global_slot_norm"] = global_slot_norms(state.lora)
            if cfg.eval_distributed_ranks and r == cfg.rounds - 1:
                line["distributed_test_accuracy"] = distributed_accuracies(setup, state, evaluate, test_batches)
            line["wall_s"] = round(time.time() - t0, 3)
            _append_jsonl(metrics_path, line)
            if (r + 1) % cfg.checkpoint_every == 0 or r == cfg.rounds - 1:
                _save_checkpoint(ckpt_dir, r, state, fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
                                 extra_meta={"cumulative": cumulative})
            rounds_done += 1
            _progress(r, cfg, line, t_run, rounds_done, quiet=quiet)
            if stop_after is not None and rounds_done >= stop_after:
                break
    finally:
        prefetch.close()
    mp.barrier("fedlora-rounds-done")  # several processes: process 0's metrics are complete
    summary = _summary(metrics_path, cfg, sum(f.trace_count() for f in round_fns.values()))
    if setup.samples is not None and rounds_done and r == cfg.rounds - 1:
        samples = generate_samples(setup, state)
        if mp.is_primary():
            atomic_write_bytes(out / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in samples).encode())
        summary["samples"] = samples
    summary["model_switches"] = {f: getattr(setup.model.config, f, None) for f in ("norm_barrier", "merged_lora")}
    summary["algorithm_options"] = {k: _jsonable_option(v) for k, v in setup.algo.options.items()}
    if mp.is_primary():
        ckpt.write_json_atomic(out / "summary.json", summary)
    final = summary.get("final_test_accuracy", summary.get("final_test_perplexity"))
    if not quiet and final is not None and rounds_done and r == cfg.rounds - 1:
        _log(_summary_text(summary), quiet=quiet)
        if summary.get("samples"):
            _log(_samples_text(summary["samples"], out / "samples.jsonl"), quiet=quiet)
    return summary


def _samples_text(samples: list[dict], path: Path, *, show: int = 3, width: int = 160) -> str:
    """The first ``show`` generated samples, each text cut to ``width`` characters, for the console."""
    cut = lambda t: " ".join(t.split()) if len(t) <= width else " ".join(t.split())[: width - 3] + "..."
    lines = [f"== generated samples ({min(show, len(samples))} of {len(samples)}; all in {path}) =="]
    for x in samples[:show]:
        lines += [f"  prompt     {cut(x['prompt'])}", f"  generated  {cut(x['generated'])}",
                  f"  reference  {cut(x['reference'])}", ""]
    return "\n".join(lines)


def _refuse_resume(out: Path):
    raise FileNotFoundError(f"nothing to resume at {out}: it holds no checkpoint (start a new run without "
                            "--resume)")


def _sync_processes(ckpt_dir: Path) -> None:
    """Several processes: check that every process sees the same latest checkpoint (the run
    directory must be on a filesystem they share) and wait for all of them. No-op with one."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    latest = ckpt.latest_round(ckpt_dir)
    try:
        multihost_utils.assert_equal(np.int64(-1 if latest is None else latest), "latest checkpoint")
    except AssertionError as err:
        raise ValueError(f"the {jax.process_count()} processes of this run see different checkpoints in {ckpt_dir} "
                         f"(this one: {latest}); the run directory must be on a filesystem every process shares"
                         ) from err


def _save_checkpoint(ckpt_dir: Path, round_idx: int, state, **kw) -> None:
    """``ckpt.save``; several processes: by process 0 alone (the state is the same everywhere)."""
    if mp.is_primary():
        ckpt.save(ckpt_dir, round_idx, state, this_process_only=True, **kw)


def _append_jsonl(path: Path, obj: dict) -> None:
    if not mp.is_primary():  # several processes: process 0 writes
        return
    with open(path, "a") as f:
        f.write(json.dumps({k: _json_round(v) for k, v in obj.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep only lines of rounds ``< start`` (a killed run may have logged past its checkpoint)."""
    if not path.exists() or not mp.is_primary():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # a line torn by the kill itself: it belongs to an unfinished round
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); the metrics file is corrupt") from err
        if row["round"] < start:
            keep.append(ln)
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _progress(r, cfg, line, t_run, done, *, quiet):
    if quiet:
        return
    elapsed = time.time() - t_run
    eta = elapsed / done * (cfg.rounds - r - 1)
    bar_n = 20
    filled = int(bar_n * (r + 1) / cfg.rounds)
    acc = line.get("test_accuracy")
    acc_s = f" test acc {acc:.4f}" if acc is not None else ""
    ppl = line.get("test_perplexity")
    acc_s += f" test ppl {ppl:.3f} tok acc {line['test_token_accuracy']:.4f}" if ppl is not None else ""
    # Rounds are numbered as in metrics.jsonl and the checkpoints: 0 .. rounds-1 ("[done/total]" counts them).
    print(f"[{'#' * filled}{'.' * (bar_n - filled)}] round {r:3d} [{r + 1}/{cfg.rounds}] "
          f"loss {line['train_loss']:.4f}"
          f"{acc_s} up {line['cum_bytes_up'] / 1e6:.2f} MB sim {line['cum_sim_time_s']:.1f}s "
          f"wall {line['wall_s']:.1f}s eta {eta:.0f}s", file=sys.stderr, flush=True)


def _headline(ev: dict) -> str:
    if "test_perplexity" in ev:
        return f"test perplexity {ev['test_perplexity']:.3f}, token accuracy {ev['test_token_accuracy']:.4f}"
    return f"test accuracy {ev['test_accuracy']:.4f}"


def _summary(metrics_path: Path, cfg: ExperimentConfig, traces: int) -> dict:
    rows = read_metrics(metrics_path)
    init = next((r for r in rows if r["round"] == -1), {})
    trained = [r for r in rows if r["round"] >= 0]
    evals = [r for r in trained if "test_accuracy" in r]
    last = trained[-1] if trained else {}
    if cfg.task == "causal_lm":
        evals = [r for r in trained if "test_perplexity" in r]
        metric = {"task": cfg.task, "initial_test_perplexity": init.get("test_perplexity"),
                  "final_test_perplexity": evals[-1]["test_perplexity"] if evals else None,
                  "best_test_perplexity": min((r["test_perplexity"] for r in evals), default=None),
                  "initial_test_token_accuracy": init.get("test_token_accuracy"),
                  "final_test_token_accuracy": evals[-1]["test_token_accuracy"] if evals else None}
        if evals and "client_test_perplexity" in evals[-1]:
            metric["final_client_test_perplexity"] = evals[-1]["client_test_perplexity"]
    else:
        metric = {"initial_test_accuracy": init.get("test_accuracy"),
                  "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
                  "best_test_accuracy": max((r["test_accuracy"] for r in evals), default=None)}
        if cfg.task != "classification":
            metric["task"] = cfg.task
        if last.get("distributed_test_accuracy"):
            metric["distributed_test_accuracy"] = last["distributed_test_accuracy"]
    return {
        "name": cfg.name, "algorithm": cfg.algorithm, "rounds_completed": len(trained),
        **metric,
        "total_bytes_up": last.get("cum_bytes_up"), "total_bytes_down": last.get("cum_bytes_down"),
        "total_sim_time_s": last.get("cum_sim_time_s"), "total_energy_j": last.get("cum_energy_j"),
        "compilations_this_call": traces,
        "fingerprint": cfg.fingerprint(),
    }


def _summary_text(s: dict) -> str:
    def mb(x):
        return "n/a" if x is None else f"{x / 1e6:.2f} MB"

    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    if "final_test_perplexity" in s:
        headline = (f"  test perplexity     {fmt(s['initial_test_perplexity'])} (untrained) -> "
                    f"{fmt(s['final_test_perplexity'])} (best {fmt(s['best_test_perplexity'])})\n")
    else:
        headline = (f"  test accuracy       {fmt(s['initial_test_accuracy'])} (untrained) -> "
                    f"{fmt(s['final_test_accuracy'])} (best {fmt(s['best_test_accuracy'])})\n")
    return ("\n== summary ==\n"
            f"  algorithm           {s['algorithm']}\n"
            f"  rounds              {s['rounds_completed']}\n"
            f"{headline}"
            f"  uplink / downlink   {mb(s['total_bytes_up'])} / {mb(s['total_bytes_down'])}\n"
            f"  simulated time      {s['total_sim_time_s'] or 0:.1f} s, "
            f"energy {(s['total_energy_j'] or 0) / 1e3:.2f} kJ\n"
            f"  compilations        {s['compilations_this_call']}\n")

