"""Task modes: everything that differs between what a run trains (encoder classification, causal
LM, classification as generation), one record per task in one file each.

The driver never branches on ``cfg.task``: it asks the run's :class:`TaskMode` (``get_task_mode(
cfg.task)``) to load the data, build the training :class:`~fedlora_jax.federated.Task` and the
evaluator, print its headline and write its part of the summary. Adding a task is one file that
builds a ``TaskMode`` and one line in :data:`TASK_MODES` (or :func:`register_task_mode` from user
code); ``docs/architecture.md`` shows it, and ``tests/driver/test_task_modes.py`` adds a toy task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class TaskData:
    """What a task's data step gives the setup (host NumPy).

    Attributes:
      train: the tokenized training set (``input_ids``, ``attention_mask``, ``labels`` ``[E, T]``).
      test_batches: ``{name: [K, B, ...]}`` evaluation batches (``example_mask`` marks real rows).
      part_labels: ``[E]`` labels behind label-skew partitions and the partition table, or None.
      label_names: the class names (``["text"]`` for a language model).
      parts: the dataset's own clients (index lists), or None to partition by ``cfg.partition``.
      num_groups: natural clients with their own test texts (per-client evaluation), or None.
      samples_from: tokenized texts the end-of-run generation samples are drawn from, or None.
      choice_answers: scoring answers shared by every prompt ``(ids [K, A], mask [K, A])``, or None.
    """

    train: Any
    test_batches: dict
    part_labels: Any
    label_names: list
    parts: list | None = None
    num_groups: int | None = None
    samples_from: Any = None
    choice_answers: Any = None


@dataclasses.dataclass(frozen=True)
class TaskMode:
    """One task: its data, loss, evaluation and reporting. Every field is a plain function.

    Attributes:
      name: the ``cfg.task`` value.
      causal_lm: the model it needs: a causal LM with an LM head (True) or an encoder
        classifier (False); the model family's record says which a model is.
      labelled: its examples carry class labels (label-skew partitions, label-entropy ranks,
        accuracy diagnostics and the per-slot norms need them).
      validate: ``validate(cfg)`` raises ``ValueError`` for fields this task cannot use (called
        by the config's validator).
      read: ``read(cfg) -> raw``: the data that fixes the model's head before the model loads
        (the labelled datasets), or None.
      num_labels: ``num_labels(raw) -> int | None``: the classifier head's size (None: no head).
      prepare: ``prepare(cfg, raw, tokenizer, token_cache_dir) -> TaskData``.
      make_task: ``make_task(graphdef, cfg) -> Task``: the training loss.
      make_evaluator: ``make_evaluator(setup) -> (evaluate, evaluate_state)``: the jitted
        evaluation and ``evaluate_state(state) -> {metric: value}`` a round logs.
      headline_metric: the metric of the headline (``test_accuracy``, ``test_perplexity``).
      higher_is_better: whether the best of the headline metric is its maximum.
      describe_targets: ``describe_targets(model, data) -> str`` for the setup line.
      summarize: ``summarize(initial_row, eval_rows, last_row) -> dict``: the task's part of
        ``summary.json`` (the headline first, initial / final / best).
      plots: whether ``fedlora train`` writes the accuracy plots for it.
      also_show: metrics printed after the headline one on the console.
    """

    name: str
    causal_lm: bool
    labelled: bool
    validate: Callable[[Any], None]
    read: Callable[[Any], Any]
    num_labels: Callable[[Any], int | None]
    prepare: Callable[..., TaskData]
    make_task: Callable[[Any, Any], Any]
    make_evaluator: Callable[[Any], tuple[Callable, Callable]]
    headline_metric: str
    higher_is_better: bool
    describe_targets: Callable[[Any, TaskData], str]
    summarize: Callable[[dict, list, dict], dict]
    plots: bool = True
    also_show: tuple[str, ...] = ()

    def headline(self, metrics: dict) -> str:
        """``"test accuracy 0.7800"``: the headline metric of one evaluation (and ``also_show``)."""
        return ", ".join(f"{m.replace('_', ' ')} {metrics[m]:.4f}"
                         for m in (self.headline_metric, *self.also_show) if m in metrics)

    def summary_line(self, summary: dict) -> str:
        """``"test accuracy 0.4817 (untrained) -> 0.7798 (best 0.7798)"`` from a summary."""
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
        m = self.headline_metric
        return (f"{m.replace('_', ' '):19s} {fmt(summary.get(f'initial_{m}'))} (untrained) -> "
                f"{fmt(summary.get(f'final_{m}'))} (best {fmt(summary.get(f'best_{m}'))})")


def headline_summary(metric: str, initial: dict, evals: list[dict], *, higher_is_better: bool) -> dict:
    """``{"initial_<m>", "final_<m>", "best_<m>"}`` of one metric over the evaluated rows."""
    values = [r[metric] for r in evals if r.get(metric) is not None]
    best = (max if higher_is_better else min)(values, default=None)
    return {f"initial_{metric}": initial.get(metric), f"final_{metric}": values[-1] if values else None,
            f"best_{metric}": best}


def spread(values) -> dict:
    """``{"mean", "min", "p10", "p50", "p90", "max"}`` of the finite entries of ``values`` ({} if none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "p10": float(np.percentile(v, 10)),
            "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "max": float(np.max(v))}


def _registry() -> dict[str, TaskMode]:
    from fedlora_jax.driver.modes import causal_lm, classification, cls_generation

    return {m.name: m for m in (classification.MODE, causal_lm.MODE, cls_generation.MODE)}


#: ``{name: TaskMode}``, filled on first use (the mode files import the data and model code).
TASK_MODES: dict[str, TaskMode] = {}


def task_modes() -> dict[str, TaskMode]:
    """The registry: the built-in modes plus any :func:`register_task_mode` added."""
    if not TASK_MODES:
        TASK_MODES.update(_registry())
    return TASK_MODES


def get_task_mode(name: str) -> TaskMode:
    """The :class:`TaskMode` of ``cfg.task``; ``ValueError`` naming the known ones."""
    modes = task_modes()
    if name not in modes:
        raise ValueError(f"unknown task {name!r}; known: {sorted(modes)}")
    return modes[name]


def register_task_mode(mode: TaskMode, *, replace: bool = False) -> TaskMode:
    """Add ``mode`` to the registry (so ``ExperimentConfig(task=mode.name)`` validates and runs).
    Refuses a name in use unless ``replace``."""
    if not isinstance(mode, TaskMode):
        raise TypeError(f"register_task_mode takes a TaskMode, got {type(mode).__name__}")
    modes = task_modes()
    if mode.name in modes and not replace:
        raise ValueError(f"task {mode.name!r} is already registered; pass replace=True to replace it")
    modes[mode.name] = mode
    return mode


def unregister_task_mode(name: str) -> None:
    """Remove a mode added by :func:`register_task_mode` (tests); the built-in ones stay."""
    if name in _registry():
        raise ValueError(f"task {name!r} is built in and cannot be removed")
    task_modes().pop(name, None)
