"""A run's setup: data (through its task mode), model, partition, ranks, algorithm, chunk size,
and the per-round inputs (sampled clients, their batches and spec, the compiled round). Everything
here is built on the host before anything is compiled, and raises clear errors on bad input."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import data as data_lib
from fedlora_jax import devices as dev_lib
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import AlgoContext, build_algorithm
from fedlora_jax.driver.config import ExperimentConfig, make_optimizer
from fedlora_jax.driver.evaluation import sample_prompts
from fedlora_jax.driver.metrics_io import log
from fedlora_jax.driver.modes import get_task_mode
from fedlora_jax.federated import (
    ServerState,
    check_population_memory,
    init_server_state,
    make_round,
    make_spec,
    population_state_bytes,
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
from fedlora_jax.models.family import family_of_model

DEFAULT_CACHE = Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora_jax"))

#: Key streams derived from the experiment seed: ``fold_in(key(seed), stream)``.
LORA_INIT_STREAM = 7
HEAD_INIT_STREAM = 10_000_019
#: NumPy streams ``default_rng([seed, round, stream])``: client sampling, failures, device speed.
SAMPLE_STREAM, DROPOUT_STREAM = 1, 2


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
    mode: Any = None               # the task's TaskMode (driver/modes)


def _resolve_devices(cfg: ExperimentConfig):
    profiles = []
    for name in cfg.device_mix:
        try:
            profiles.append(dev_lib.get_profile(name))
        except (KeyError, ValueError) as err:
            raise ValueError(f"config field 'device_mix' has unknown device {name!r}; known: "
                             f"{sorted(dev_lib.PROFILES)}") from err
    return profiles



def _model_shape(model, cfg: ExperimentConfig, targets: dict, num_labels: int, *, family):
    """The cost model's :class:`~fedlora_jax.devices.ModelShape` of the run's model (a decoder:
    an LM head over the vocabulary per token, and its family's FFN matrix count)."""
    mc = model.config
    per_layer = {t.module: (t.in_features, t.out_features) for t in targets.values()}
    lm = dict(causal_lm=True, ffn_matrices=family.ffn_matrices) if family.causal_lm else {}
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
    mode = get_task_mode(cfg.task)
    if not mode.labelled:
        raise ValueError(f"classification_partition_table: task {cfg.task!r} on {cfg.dataset!r} has no labels")
    train_ds, _ = mode.read(cfg)
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



def build_setup(cfg: ExperimentConfig, *, quiet: bool = False, cache_dir: Path | None = None) -> Setup:
    """Load data and model, partition, build the algorithm. Raises clear errors on bad input
    before anything is compiled."""
    cache_dir = DEFAULT_CACHE if cache_dir is None else Path(cache_dir)
    t0 = time.time()
    mode = get_task_mode(cfg.task)
    raw = mode.read(cfg)
    num_labels = mode.num_labels(raw)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = model_loading.from_pretrained(cfg.model, num_labels=num_labels, dtype=dtype,
                                          key=jax.random.fold_in(jax.random.key(cfg.seed), HEAD_INIT_STREAM),
                                          norm_barrier=cfg.norm_barrier, merged_lora=cfg.merged_lora)
    family = family_of_model(model)
    lm = family.causal_lm
    if lm and not mode.causal_lm:
        raise ValueError(f"config field 'task' = {cfg.task!r} needs an encoder classifier, but model "
                         f"{cfg.model!r} is a causal LM ({type(model).__name__}); use task='cls_generation' or "
                         "'causal_lm'")
    if mode.causal_lm and not lm:
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
    data = mode.prepare(cfg, raw, tokenizer, cache_dir / "tokens")
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
    shape = _model_shape(model, cfg, targets, num_labels or 2, family=family)
    ctx = AlgoContext(keys=keys, layer_of_key={k: targets[k].layer for k in keys},
                      num_layers=model.config.num_layers, r_max=cfg.r_max, client_ranks=ranks,
                      client_devices=client_devices, rounds=cfg.rounds, scale=cfg.scale,
                      aggregator_options=dict(cfg.aggregator_options), seed=cfg.seed,
                      device_profiles=tuple(profiles), model_shape=shape, batch_size=cfg.batch_size,
                      local_steps=cfg.local_steps, deadline_s=cfg.deadline_s or None)
    algo = build_algorithm(cfg.algorithm, ctx, **cfg.algo)
    _check_engine_fields(cfg, algo, model.config.num_layers)
    task = mode.make_task(graphdef, cfg)
    chunk_size = _fit_chunk_size(cfg, model, targets)
    samples = None
    if cfg.generate_samples:
        from fedlora_jax.models.generate import supports_generation

        if not supports_generation(model):
            raise ValueError(f"config field 'generate_samples' = {cfg.generate_samples}: {type(model).__name__} "
                             "has no cached generation path")
        samples = sample_prompts(data.samples_from, cfg.generate_samples) + (data.samples_from,)
    n_test = int(np.sum(data.test_batches["example_mask"]))
    log(f"setup: task {cfg.task}, {n_train} train / {n_test} test examples, "
        f"{mode.describe_targets(model, data)}, {len(keys)} adapted modules, {time.time() - t0:.1f}s", quiet=quiet)
    return Setup(cfg, model, graphdef, base, head0, targets, train, data.test_batches, parts,
                 list(data.label_names), algo, ctx, shape, dev_lib.stack_profiles(profiles),
                 task, chunk_size, part_labels=data.part_labels, num_groups=data.num_groups,
                 tokenizer=tokenizer, samples=samples, choice_answers=data.choice_answers, mode=mode)


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



def batches_for(setup: Setup, client_ids: np.ndarray, round_idx: int):
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



def make_round_fn(setup: Setup, static_grad_cut: int | None = None):
    """The run's compiled round (``make_round`` with the config's optimizer, chunk and engine
    switches); several processes: wrapped to take this process's clients' batches."""
    cfg = setup.cfg
    opt = make_optimizer(cfg)
    mesh = mp.global_client_mesh() if jax.process_count() > 1 else None
    round_fn = make_round(setup.task, setup.algo, optimizer=opt, chunk_size=setup.chunk_size,
                          static_grad_cut=static_grad_cut, return_client_models=cfg.diagnose_first_round, mesh=mesh,
                          cut_variants=cfg.cut_variants or None, client_state_on_host=cfg.client_state == "host")
    # Several processes: each passes its own clients' batches; state and metrics come back to the host.
    return round_fn if mesh is None else mp.DistributedRound(round_fn, mesh)



def client_spec(setup: Setup, plan, client_ids, num_steps, weights):
    return make_spec(plan.masks, update_masks=plan.update_masks, num_steps=num_steps, weight=weights,
                     client_id=client_ids, num_layers=setup.ctx.num_layers, depth_mask=plan.depth_mask,
                     device_id=setup.ctx.client_devices[client_ids], layer_of_key=setup.ctx.layer_of_key,
                     global_masks=plan.global_masks)
