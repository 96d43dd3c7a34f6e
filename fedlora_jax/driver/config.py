"""Experiment configuration: one frozen dataclass, configs as code, safe overrides.

A config file is a Python module in ``experiments/configs/`` that defines
``get_config(variant: str = "full") -> ExperimentConfig`` (big_vision style: the docstring is
the runbook). Overrides from the command line are ``key=value`` strings parsed with
``ast.literal_eval`` (never ``eval``) and checked against the field's type; an unknown key is
refused with the closest valid key suggested.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from fedlora_jax.algorithms.base import build_options
from fedlora_jax.algorithms.registry import ALIASES, BUILDERS, canonical_name

#: Registered algorithm names (aliases such as ``fedavg`` are accepted too), from the registry.
ALGORITHMS = tuple(BUILDERS)
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural")
RANK_ORDERS = ("given", "label_entropy")
#: The built-in tasks (an encoder classifier, a causal LM, classification as generation on an LM);
#: the registry (``fedlora_jax.driver.modes``) holds them and any a user registers.
TASKS = ("classification", "causal_lm", "cls_generation")
#: optax optimizers ``optimizer`` may name: each is called as ``optax.<name>(learning_rate=lr,
#: **optimizer_options)`` (plus ``weight_decay`` where it takes one).
OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor", "rmsprop", "adagrad", "lamb", "nadamw", "radam",
              "yogi", "adabelief", "novograd")
LM_LOSSES = ("all", "response")
#: Datasets that come with their clients (``partition="natural"``).
NATURAL_DATASETS = ("shakespeare",)
#: Fields added after configs were first fingerprinted: left out of the fingerprint while they
#: hold their default, so runs checkpointed before they existed still resume.
#: Engine switches that give bit-identical numbers (tested): never part of the fingerprint.
_ENGINE_FIELDS = ("cut_variants", "client_state")
_LATE_FIELDS = ("task", "lm_loss", "chat_template", "generate_samples", "generate_max_new_tokens",
                "generate_temperature", "natural_min_lines", "natural_test_per_client", "eval_distributed_ranks",
                "optimizer", "optimizer_options", "label_smoothing", "freeze_head")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a federated fine-tuning run.

    Model / data:
      model: local directory, HF cache name, or ``"all-MiniLM-L6-v2"`` (installed package).
      dataset: ``"sst2"``, ``"agnews"`` or a local path; ``train_split``/``test_split`` names.
      max_length: ``T`` tokens per example. ``train_limit``/``test_limit``: use only the first
        examples (0 = all).
    Federation:
      num_clients, clients_per_round, rounds, local_steps (``S``), batch_size (``B``),
      partition (``iid | dirichlet | shards | quantity``), dirichlet_alpha, shards_per_client,
      quantity_power, batch_policy (``epoch | exact``).
    LoRA:
      r_max (static ``R``), lora_alpha (scale = lora_alpha / r_max), target_modules,
      client_ranks: ranks assigned round-robin to clients (heterogeneous ranks), or empty
      for ``r_max`` everywhere.
      rank_order: which client gets which of those ranks. ``given`` (default): client ``i``
        gets ``client_ranks[i % len(client_ranks)]``. ``label_entropy``: the same ranks, the
        highest on the clients whose training labels are most balanced (largest entropy of the
        label histogram; ties by client index). Needs ``client_ranks`` and a labelled task.
      client_groups: data-quality groups ``((num_clients, dirichlet_alpha, rank), ...)``
        (Byun & Lee's setting): the examples are split over the groups in proportion to their
        sizes, each group's share is Dirichlet-partitioned with its own alpha, and its clients
        get its rank. The sizes must sum to ``num_clients``; excludes ``client_ranks`` and
        needs ``partition="dirichlet"``.
    Algorithm:
      algorithm (one of ``ALGORITHMS`` or an alias), algo: the keyword options of the
      algorithm's factory (e.g. ``{"target_rank": 4}`` for FedARA; the factory's signature is
      the schema), aggregator_options for the aggregator.
    Devices:
      device_mix: device profile names assigned round-robin to clients (cost model);
      deadline_s: clients slower than this (simulated) are dropped (0 = none);
      dropout_prob: probability a sampled client fails mid-round;
      device_drift, device_noise: the simulated devices' true speed drifts (per-round std of
        a log random walk per client) and jitters (per-round log std) around the profile's
        nominal speed (``devices.true_speed_factor``); 0 = every device runs at its nominal
        speed. The measured times feed deadlines and LEGEND's capacity estimates.
    Optimisation / run:
      optimizer: the clients' inner optimizer, an optax name in ``OPTIMIZERS`` (default
        ``"adamw"``), built by :func:`make_optimizer` as ``optax.<name>(learning_rate=lr,
        weight_decay=weight_decay, **optimizer_options)``; optimizer_options: its other keyword
        options (checked against its signature; plain numbers, strings, booleans or None).
        ``weight_decay > 0`` with an optimizer that takes none is refused.
      label_smoothing: classification's cross-entropy against labels smoothed by this much
        (``optax.smooth_labels``; 0 = none; token-loss tasks refuse it).
      freeze_head: the classifier head stays at its initialization (the same in every arm of a
        seed: it comes from the seed) and does not travel: the optimizer's head updates are set
        to zero (``optax.multi_transform``, so weight decay and momentum cannot move it) and
        the traffic counts the adapter alone. The control of the FFA-LoRA line of work: every
        accuracy gain is the adapters'. Classification only; a run whose algorithm trains no adapter
        slot in its first round (the head-only control) is refused: nothing would train.
      lr, weight_decay, seed, chunk_size (an upper bound: the driver lowers it to fit the
      device's memory and, on CPU, to ``federated.cpu_cache_chunk_cap``), eval_every,
      eval_batch_size, checkpoint_every, dtype (compute dtype ``float32 | bfloat16``),
      remat (``jax.checkpoint`` each transformer block: less activation memory for ~1 extra
      forward), norm_barrier and merged_lora (the models' exact CPU speed-ups, ``auto | on |
      off``, see :mod:`fedlora_jax.models.switches`; ``auto`` is resolved when the model is
      built and the resolved choice is written to ``summary.json``).
    Engine (same numbers either way, so not in the fingerprint):
      cut_variants: static gradient cuts compiled into the one round (e.g. ``(3, 5)``; ``()`` =
        off): clients are ordered by their lowest adapted layer and each chunk runs the
        variant with the largest cut at or below it, so clients with shallow LoRA depth
        (LEGEND) pay no backward pass below their depth (``make_round(cut_variants=)``).
        List the cuts the depths need (``L - d`` for each depth ``d``); each variant is
        compiled once (compile time grows with their number). Excludes an algorithm's
        ``static_cut`` (FedARA).
      client_state: where the population's per-client state (FedSA's local factors, HAFL's
        score history) lives: ``"device"`` or ``"host"`` (NumPy in host RAM; only the sampled
        clients' slices go to the device each round). Checked against the memory available
        before anything is allocated.
    Task (``task``):
      ``"classification"``: an encoder classifier (``labels [B]``). ``"causal_lm"``: next-token
        fine-tuning of a decoder (Llama / Qwen2 / GPT-2) on ``dataset``: a local jsonl/text
        folder read by :func:`fedlora_jax.data.load_causal_lm` (whole texts, or instruction /
        response pairs) or ``"shakespeare"`` (one client per role with ``partition="natural"``;
        ``num_clients`` of them are used, each with its own held-out texts;
        ``natural_min_lines``: the fewest lines a role needs to be a client;
        ``natural_test_per_client``: evaluate on at most this many of each client's held-out
        texts, the first ones in play order (0 = all; bounds the evaluation cost while every
        client keeps its test texts, unlike ``test_limit``, which keeps the first texts of the
        whole set, i.e. of the first clients). Metrics are the
        mean token NLL, perplexity and next-token accuracy. ``"cls_generation"``: a labelled
        dataset (``sst2``, ``agnews``, ...) on a decoder: each example becomes a prompt asking
        for the label and the label word as the answer (loss on the answer tokens only);
        accuracy = the label word of highest log-likelihood given the prompt.
      lm_loss: ``"response"`` (instruction data: prompt tokens carry no loss) or ``"all"``
        (every token of the text is a target). Causal LM only.
      chat_template: wrap prompts in the tokenizer's chat template (when it has one).
      generate_samples: at the end, generate from this many test prompts (instruction prompts,
        or the first half of a test text) into ``samples.jsonl`` and ``summary.json``;
        generate_max_new_tokens, generate_temperature (0 = greedy): their settings.
    Diagnostics:
      diagnose_first_round: after round 0, log the test accuracy of the highest-rank
        participating client's own model just before aggregation and of what it receives just
        after (Byun & Lee's dilution diagnostic), as ``first_round_diagnostic`` in the metrics.
      eval_distributed_ranks: after the last round, evaluate the model a client of each of these
        ranks receives (the algorithm's own plan and distribute for the population's first
        client of that rank), as ``distributed_test_accuracy`` ``{rank: accuracy}`` in the last
        metrics row and the summary (HAFL's "degradation at distribution"). Every rank must be
        held by some client. Every evaluated row also logs ``global_slot_norm`` ``[R]``: per
        rank slot ``i``, the sum over modules of ``|e_i| ||a[:, i]|| ||b[i, :]||`` of the global
        adapter (how much each slot carries; Byun & Lee's dilution of the high slots).
    """

    name: str = "experiment"
    model: str = "all-MiniLM-L6-v2"
    dataset: str = "sst2"
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = ""
    label_column: str = "label"
    max_length: int = 64
    train_limit: int = 0
    test_limit: int = 0
    num_clients: int = 10
    clients_per_round: int = 5
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 16
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    quantity_power: float = 1.5
    batch_policy: str = "epoch"
    r_max: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    client_ranks: tuple[int, ...] = ()
    rank_order: str = "given"
    client_groups: tuple[tuple[int, float, int], ...] = ()
    algorithm: str = "fedit"
    algo: dict = dataclasses.field(default_factory=dict)
    aggregator_options: dict = dataclasses.field(default_factory=dict)
    device_mix: tuple[str, ...] = ("jetson_agx_orin_64gb",)
    deadline_s: float = 0.0
    dropout_prob: float = 0.0
    device_drift: float = 0.0
    device_noise: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    optimizer_options: dict = dataclasses.field(default_factory=dict)
    label_smoothing: float = 0.0
    freeze_head: bool = False
    seed: int = 0
    chunk_size: int = 8
    eval_every: int = 1
    eval_batch_size: int = 64
    checkpoint_every: int = 1
    dtype: str = "float32"
    remat: bool = False
    norm_barrier: str = "auto"
    merged_lora: str = "auto"
    diagnose_first_round: bool = False
    eval_distributed_ranks: tuple[int, ...] = ()
    task: str = "classification"
    lm_loss: str = "response"
    chat_template: bool = False
    generate_samples: int = 0
    generate_max_new_tokens: int = 32
    generate_temperature: float = 0.0
    natural_min_lines: int = 64
    natural_test_per_client: int = 0
    cut_variants: tuple[int, ...] = ()
    client_state: str = "device"

    def __post_init__(self):
        validate(self)

    @property
    def scale(self) -> float:
        """The LoRA scale ``lora_alpha / r_max`` (one scale for every client)."""
        return self.lora_alpha / self.r_max

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def fingerprint(self) -> str:
        """Hash of every field that changes the numbers (not ``name``, ``rounds``,
        ``eval_every``, ``checkpoint_every``, ``eval_batch_size``, nor the engine fields
        ``cut_variants`` / ``client_state``, which give identical numbers): a checkpoint is only resumed
        under a config with the same fingerprint."""
        d = self.to_dict()
        for k in ("name", "rounds", "eval_every", "checkpoint_every", "eval_batch_size") + _ENGINE_FIELDS:
            d.pop(k)
        for k in _LATE_FIELDS:
            if d[k] == _default(k):
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _default(name: str):
    """A field's default value (calling its ``default_factory`` where it has one)."""
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    return v


def fail_field(field: str, value, allowed: str):
    """Raise the config's ``ValueError``: the field, its value and what is allowed."""
    raise ValueError(f"config field {field!r} = {value!r} is invalid: expected {allowed}")


def validate(cfg: ExperimentConfig) -> None:
    """Check every field; raise ``ValueError`` naming the field, the value and what is allowed."""
    pos_int = ("max_length", "num_clients", "clients_per_round", "rounds", "local_steps", "batch_size",
               "r_max", "chunk_size", "eval_every", "eval_batch_size", "checkpoint_every", "shards_per_client")
    for f in pos_int:
        v = getattr(cfg, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            fail_field(f, v, "an int >= 1")
    for f in ("train_limit", "test_limit", "seed", "natural_test_per_client"):
        v = getattr(cfg, f)
        if not isinstance(v, int) or v < 0:
            fail_field(f, v, "an int >= 0")
    if not isinstance(cfg.cut_variants, tuple) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in cfg.cut_variants):
        fail_field("cut_variants", cfg.cut_variants, "a tuple of ints >= 0 (layer indices), e.g. (3, 5)")
    ranks = cfg.eval_distributed_ranks
    if not isinstance(ranks, tuple) or any(
            not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cfg.r_max for v in ranks):
        fail_field("eval_distributed_ranks", cfg.eval_distributed_ranks, f"a tuple of ranks in [1, r_max={cfg.r_max}]")
    if cfg.client_state not in ("device", "host"):
        fail_field("client_state", cfg.client_state, "'device' or 'host'")
    if cfg.clients_per_round > cfg.num_clients:
        fail_field("clients_per_round", cfg.clients_per_round, f"<= num_clients ({cfg.num_clients})")
    try:
        name = canonical_name(cfg.algorithm)
    except (TypeError, ValueError):
        names = ALGORITHMS + tuple(ALIASES)
        fail_field("algorithm", cfg.algorithm, f"one of {ALGORITHMS} or an alias of {sorted(ALIASES)}"
              f"{_suggest(str(cfg.algorithm).strip().lower(), names)}")
    build_options(BUILDERS[name], cfg.algo, name)
    _validate_groups(cfg)
    if cfg.partition not in PARTITIONS:
        fail_field("partition", cfg.partition, f"one of {PARTITIONS}{_suggest(cfg.partition, PARTITIONS)}")
    if cfg.partition == "dirichlet" and not cfg.dirichlet_alpha > 0:
        fail_field("dirichlet_alpha", cfg.dirichlet_alpha, "a float > 0")
    if cfg.batch_policy not in ("epoch", "exact"):
        fail_field("batch_policy", cfg.batch_policy, "'epoch' or 'exact'")
    for r in cfg.client_ranks:
        if not isinstance(r, int) or r < 1 or r > cfg.r_max:
            fail_field("client_ranks", cfg.client_ranks, f"ints in [1, r_max={cfg.r_max}]")
    if cfg.rank_order not in RANK_ORDERS:
        fail_field("rank_order", cfg.rank_order, f"one of {RANK_ORDERS}{_suggest(cfg.rank_order, RANK_ORDERS)}")
    if cfg.rank_order == "label_entropy" and not cfg.client_ranks:
        fail_field("rank_order", cfg.rank_order, "client_ranks to reorder and a labelled task (not causal_lm)")
    if not cfg.target_modules:
        fail_field("target_modules", cfg.target_modules, "at least one module name")
    if not cfg.lr > 0:
        fail_field("lr", cfg.lr, "a float > 0")
    if cfg.weight_decay < 0:
        fail_field("weight_decay", cfg.weight_decay, "a float >= 0")
    _validate_optimizer(cfg)
    ls = cfg.label_smoothing
    if not isinstance(ls, (int, float)) or isinstance(ls, bool) or not 0 <= ls < 1:
        fail_field("label_smoothing", ls, "a float in [0, 1)")
    if not isinstance(cfg.freeze_head, bool):
        fail_field("freeze_head", cfg.freeze_head, "True or False")
    if not 0 <= cfg.dropout_prob < 1:
        fail_field("dropout_prob", cfg.dropout_prob, "a float in [0, 1)")
    if cfg.deadline_s < 0:
        fail_field("deadline_s", cfg.deadline_s, "a float >= 0 (0 = no deadline)")
    if cfg.dtype not in ("float32", "bfloat16"):
        fail_field("dtype", cfg.dtype, "'float32' or 'bfloat16'")
    if not cfg.device_mix:
        fail_field("device_mix", cfg.device_mix, "at least one device profile name")
    for f in ("norm_barrier", "merged_lora"):
        if getattr(cfg, f) not in ("auto", "on", "off"):
            fail_field(f, getattr(cfg, f), "'auto', 'on' or 'off'")
    for f in ("device_drift", "device_noise"):
        v = getattr(cfg, f)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 10:
            fail_field(f, v, "a float in [0, 10)")
    _validate_task(cfg)


def _validate_task(cfg: ExperimentConfig) -> None:
    from fedlora_jax.driver.modes import task_modes

    modes = task_modes()
    if cfg.task not in modes:
        names = tuple(modes)
        fail_field("task", cfg.task, f"one of {names}{_suggest(cfg.task, names)}")
    if cfg.lm_loss not in LM_LOSSES:
        fail_field("lm_loss", cfg.lm_loss, f"one of {LM_LOSSES}")
    if not isinstance(cfg.chat_template, bool):
        fail_field("chat_template", cfg.chat_template, "True or False")
    for f, lo in (("generate_samples", 0), ("generate_max_new_tokens", 1), ("natural_min_lines", 1)):
        v = getattr(cfg, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            fail_field(f, v, f"an int >= {lo}")
    t = cfg.generate_temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
        fail_field("generate_temperature", t, "a float >= 0 (0 = greedy)")
    if cfg.natural_test_per_client and cfg.dataset not in NATURAL_DATASETS:
        fail_field("natural_test_per_client", cfg.natural_test_per_client, f"0 unless the dataset comes with clients "
              f"({NATURAL_DATASETS}), got dataset={cfg.dataset!r}")
    if cfg.partition == "natural" and cfg.dataset not in NATURAL_DATASETS:
        fail_field("partition", cfg.partition, f"a dataset that comes with clients ({NATURAL_DATASETS}), got "
              f"dataset={cfg.dataset!r}")
    modes[cfg.task].validate(cfg)


def _optimizer_parameters(name: str) -> dict:
    import inspect

    import optax

    return dict(inspect.signature(getattr(optax, name)).parameters)


def _validate_optimizer(cfg: ExperimentConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        fail_field("optimizer", cfg.optimizer, f"one of {OPTIMIZERS}{_suggest(str(cfg.optimizer), OPTIMIZERS)}")
    if not isinstance(cfg.optimizer_options, dict):
        fail_field("optimizer_options", cfg.optimizer_options, "a dict of keyword options")
    params = _optimizer_parameters(cfg.optimizer)
    for key, value in cfg.optimizer_options.items():
        if key in ("learning_rate", "weight_decay"):
            fail_field("optimizer_options", cfg.optimizer_options, f"no {key!r} (set the config field "
                  f"{'lr' if key == 'learning_rate' else key!r} instead)")
        if key not in params:
            known = sorted(set(params) - {"learning_rate", "weight_decay"})
            fail_field("optimizer_options", cfg.optimizer_options, f"options of optax.{cfg.optimizer} ({known}); "
                  f"{key!r} is not one{_suggest(str(key), tuple(known))}")
        if not isinstance(value, (bool, int, float, str, type(None))):
            fail_field("optimizer_options", cfg.optimizer_options, f"plain values (numbers, strings, booleans, None); "
                  f"{key!r} is a {type(value).__name__}")
    if cfg.weight_decay and "weight_decay" not in params:
        fail_field("weight_decay", cfg.weight_decay, f"0.0 with optimizer={cfg.optimizer!r} (optax.{cfg.optimizer} "
              "takes no weight_decay; use 'adamw', 'lion', 'adafactor', ...)")


def make_optimizer(cfg: ExperimentConfig):
    """The clients' inner optimizer: ``optax.<optimizer>(learning_rate=lr, **optimizer_options)``,
    with ``weight_decay`` where the optimizer takes one (validated by the config)."""
    import optax

    kwargs = dict(cfg.optimizer_options)
    if "weight_decay" in _optimizer_parameters(cfg.optimizer):
        kwargs["weight_decay"] = cfg.weight_decay
    inner = getattr(optax, cfg.optimizer)(learning_rate=cfg.lr, **kwargs)
    if not cfg.freeze_head:
        return inner
    # the trainable tree is {"lora": ..., "head": ...}: the head's updates are exactly zero
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()},
                                 lambda tr: {k: "frozen" if k == "head" else "train" for k in tr})


def _validate_groups(cfg: ExperimentConfig) -> None:
    if not cfg.client_groups:
        return
    want = "a tuple of (num_clients: int >= 1, dirichlet_alpha: float > 0, rank: int in [1, r_max]) triples"
    for g in cfg.client_groups:
        if (not isinstance(g, (tuple, list)) or len(g) != 3 or not isinstance(g[0], int) or g[0] < 1
                or not isinstance(g[1], (int, float)) or not g[1] > 0 or not isinstance(g[2], int)
                or not 1 <= g[2] <= cfg.r_max):
            fail_field("client_groups", cfg.client_groups, want)
    if sum(g[0] for g in cfg.client_groups) != cfg.num_clients:
        fail_field("client_groups", cfg.client_groups, f"group sizes summing to num_clients ({cfg.num_clients})")
    if cfg.client_ranks:
        fail_field("client_groups", cfg.client_groups, "no client_ranks beside it (groups carry their ranks)")
    if cfg.partition != "dirichlet":
        fail_field("client_groups", cfg.client_groups, "partition='dirichlet' (each group has its own alpha)")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def _coerce(name: str, raw: str) -> Any:
    field = FIELDS[name]
    default = getattr(ExperimentConfig(), name) if name not in ("algo", "aggregator_options") else {}
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    if isinstance(default, tuple):
        if isinstance(value, (str, int)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"override {name}={raw!r}: expected a list for field {name!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"override {name}={raw!r}: expected True/False")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"override {name}={raw!r}: expected a dict literal")
        return value
    if not isinstance(value, type(default)):
        raise ValueError(f"override {name}={raw!r}: expected {field.type} like {default!r}")
    return value


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | None) -> ExperimentConfig:
    """Apply ``key=value`` overrides (``algo.target_rank=4`` sets a key of a dict field)."""
    changes: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." in key:
            top, sub = key.split(".", 1)
            check_key(top)
            if not isinstance(getattr(cfg, top), dict):
                raise ValueError(f"override {key!r}: field {top!r} is not a dict")
            d = dict(changes.get(top, getattr(cfg, top)))
            try:
                d[sub] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                d[sub] = raw
            changes[top] = d
            continue
        check_key(key)
        changes[key] = _coerce(key, raw)
    return dataclasses.replace(cfg, **changes)


def check_key(key: str) -> None:
    """Refuse an unknown config key, suggesting the closest valid one."""
    if key not in FIELDS:
        raise ValueError(f"unknown config key {key!r}{_suggest(key, FIELDS)}; valid keys: "
                         f"{', '.join(sorted(FIELDS))}")


def from_dict(d: dict) -> ExperimentConfig:
    """Build a config from a plain dict (e.g. a checkpoint's saved config); unknown keys refused."""
    for k in d:
        check_key(k)
    defaults, kw = ExperimentConfig(), {}
    for k, v in d.items():
        if isinstance(getattr(defaults, k), tuple):
            if not isinstance(v, (list, tuple)):
                fail_field(k, v, "a list")
            v = tuple(v)
        kw[k] = v
    return ExperimentConfig(**kw)


#: The CI-sized ("smoke") version of an experiment: 2 rounds, a few examples, 16 tokens.
SMOKE_OVERRIDES = dict(train_limit=64, test_limit=32, num_clients=4, clients_per_round=2, rounds=2, local_steps=1,
                       batch_size=4, max_length=16, chunk_size=2, eval_batch_size=32)


def select_variant(cfg: ExperimentConfig, variant: str, **smoke_overrides) -> ExperimentConfig:
    """``"full"`` -> ``cfg``; ``"smoke"`` -> ``cfg`` with :data:`SMOKE_OVERRIDES` (then
    ``smoke_overrides``) and ``-smoke`` appended to its name; anything else -> ``ValueError``."""
    if variant == "full":
        return cfg
    if variant == "smoke":
        return dataclasses.replace(cfg, name=f"{cfg.name}-smoke", **{**SMOKE_OVERRIDES, **smoke_overrides})
    raise ValueError(f"variant must be 'full' or 'smoke', got {variant!r}")


class ConfigFileError(ValueError):
    """A ``--config`` file that is not a usable config: names the file and what was expected."""


#: What a config file must be, for the errors of :func:`load_config`.
CONFIG_EXPECTED = "a .py file defining get_config(variant) -> ExperimentConfig, or a .json object of config fields"


def _one_line(err: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _line_in(err: BaseException, path: Path) -> str:
    """`` at line N``: where in ``path`` the exception was raised, if it was raised there."""
    lineno, tb = None, err.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {lineno}" if lineno else ""


def _load_json_config(path: Path) -> ExperimentConfig:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigFileError(f"config file {str(path)!r} is not valid JSON ({_one_line(err)}); expected "
                              f"{CONFIG_EXPECTED}") from err
    if not isinstance(d, dict):
        raise ConfigFileError(f"config file {str(path)!r} holds a JSON {type(d).__name__}; expected "
                              f"{CONFIG_EXPECTED}")
    try:
        return from_dict(d)
    except (ValueError, TypeError) as err:
        raise ConfigFileError(f"config file {str(path)!r}: {' '.join(str(err).split())}") from err


def _load_module_config(path: Path, variant: str) -> ExperimentConfig:
    spec = importlib.util.spec_from_file_location(f"fedlora_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        if err.filename and Path(err.filename) != path:  # a module the config imports
            raise ConfigFileError(f"config file {str(path)!r} failed to import: {_one_line(err)}") from err
        where = f" at line {err.lineno}" if err.lineno else ""
        raise ConfigFileError(f"config file {str(path)!r} is not valid Python ({type(err).__name__}{where}: "
                              f"{' '.join(str(err.msg).split())}); expected {CONFIG_EXPECTED}") from err
    except Exception as err:
        raise ConfigFileError(f"config file {str(path)!r} failed to import{_line_in(err, path)}: {_one_line(err)}"
                              ) from err
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigFileError(f"config file {str(path)!r} defines no get_config(variant); expected {CONFIG_EXPECTED}")
    if not callable(get_config):
        raise ConfigFileError(f"config file {str(path)!r}: get_config is not a function (got "
                              f"{type(get_config).__name__}); expected {CONFIG_EXPECTED}")
    try:
        cfg = get_config(variant)
    except Exception as err:
        raise ConfigFileError(f"config file {str(path)!r}: get_config({variant!r}) failed{_line_in(err, path)}: "
                              f"{_one_line(err)}") from err
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigFileError(f"config file {str(path)!r}: get_config({variant!r}) returned a "
                              f"{type(cfg).__name__}, expected an ExperimentConfig")
    return cfg


def load_config(path: str | Path, *, variant: str = "full", overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Load ``get_config(variant)`` from a config module file, then apply overrides.

    A ``.json`` file is read as a plain dict instead (keys checked the same way). Anything else
    (another suffix, a module that does not import, no ``get_config``, a ``get_config`` that
    raises or returns something else) raises :class:`ConfigFileError` (a ``ValueError``) with a
    one-line message naming the file and what was expected; a missing file raises
    ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigFileError(f"config file {str(path)!r} is not a file; expected {CONFIG_EXPECTED}")
    if path.suffix == ".json":
        cfg = _load_json_config(path)
    elif path.suffix == ".py":
        cfg = _load_module_config(path, variant)
    else:
        raise ConfigFileError(f"config file {str(path)!r} is not a .py or .json file; expected {CONFIG_EXPECTED}")
    return apply_overrides(cfg, overrides)
