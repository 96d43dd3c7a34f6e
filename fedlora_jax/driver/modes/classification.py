"""Task ``classification``: an encoder (BERT / RoBERTa / MiniLM) with a new linear head,
cross-entropy (optionally label-smoothed) on labelled text; test accuracy is the headline."""

from __future__ import annotations

import numpy as np

from fedlora_jax.driver.config import fail_field as fail
from fedlora_jax.driver.modes import TaskData, TaskMode, headline_summary


def validate(cfg) -> None:
    validate_labelled(cfg)
    if cfg.generate_samples:
        fail("generate_samples", cfg.generate_samples, "0 for task='classification' (an encoder does not "
             "generate); use task='causal_lm' or 'cls_generation'")


def validate_labelled(cfg) -> None:
    """Rules of every task that reads a labelled dataset."""
    from fedlora_jax.driver.config import NATURAL_DATASETS

    if cfg.partition == "natural":
        fail("partition", cfg.partition, "task='causal_lm' (the natural clients hold texts)")
    if cfg.dataset in NATURAL_DATASETS:
        fail("dataset", cfg.dataset, "task='causal_lm' (Shakespeare holds texts, not labels)")


def read_labelled(cfg):
    """``(train, test)`` labelled datasets (the test set takes the training set's label names)."""
    from fedlora_jax import data as data_lib

    text_col = cfg.text_column or None
    train_ds = data_lib.load_text_classification(cfg.dataset, split=cfg.train_split, text_column=text_col,
                                                 label_column=cfg.label_column,
                                                 max_examples=cfg.train_limit or None)
    test_ds = data_lib.load_text_classification(cfg.dataset, split=cfg.test_split, text_column=text_col,
                                                label_column=cfg.label_column, label_names=train_ds.label_names,
                                                max_examples=cfg.test_limit or None)
    return train_ds, test_ds


def batches_dict(ev) -> dict:
    """The evaluation batches of a tokenized set as the evaluators' dict."""
    return {"input_ids": ev.input_ids, "attention_mask": ev.attention_mask, "labels": ev.labels,
            "example_mask": ev.example_mask}


def prepare(cfg, raw, tokenizer, tok_cache) -> TaskData:
    from fedlora_jax import data as data_lib

    train_ds, test_ds = raw
    train = data_lib.tokenize(train_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test = data_lib.tokenize(test_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    ev = data_lib.eval_batches(test, cfg.eval_batch_size)
    return TaskData(train, batches_dict(ev), train.labels, list(train_ds.label_names))


def make_task(graphdef, cfg):
    from fedlora_jax.driver.tasks import classification_task

    return classification_task(graphdef, scale=cfg.scale, label_smoothing=cfg.label_smoothing, remat=cfg.remat)


def accuracy_evaluator(setup, evaluate):
    """``evaluate_state(state)`` of a labelled task from its jitted ``evaluate`` (which returns
    ``(accuracy, loss, per_class [K])``): ``test_accuracy``, ``test_loss``, ``test_class_accuracy``
    (None for a class absent from the test set) and ``client_test_accuracy`` (each client's accuracy
    under its label histogram)."""
    import jax
    import jax.numpy as jnp

    from fedlora_jax import data as data_lib
    from fedlora_jax.driver.evaluation import evaluate_global
    from fedlora_jax.driver.tasks import client_accuracies

    test_batches = jax.tree.map(jnp.asarray, setup.test_batches)
    label_hist = data_lib.label_histograms(setup.parts, setup.part_labels, len(setup.label_names))

    def evaluate_state(st) -> dict:
        acc, loss, per_class = evaluate_global(setup, st, evaluate, test_batches)
        ca = client_accuracies(per_class, label_hist)
        return {"test_accuracy": float(acc), "test_loss": float(loss),
                "test_class_accuracy": [float(a) if np.isfinite(a) else None for a in np.asarray(per_class)],
                "client_test_accuracy": {"mean": float(np.mean(ca)), "min": float(np.min(ca)),
                                         "p10": float(np.percentile(ca, 10)), "max": float(np.max(ca))}}

    return evaluate_state


def make_evaluator(setup):
    from fedlora_jax.driver.tasks import make_evaluate

    evaluate = make_evaluate(setup.graphdef, scale=setup.cfg.scale, num_classes=len(setup.label_names))
    return evaluate, accuracy_evaluator(setup, evaluate)


def describe_labels(model, data: TaskData) -> str:
    return f"{len(data.label_names)} labels"


def summarize_accuracy(initial: dict, evals: list, last: dict) -> dict:
    out = headline_summary("test_accuracy", initial, evals, higher_is_better=True)
    if last.get("distributed_test_accuracy"):
        out["distributed_test_accuracy"] = last["distributed_test_accuracy"]
    return out


MODE = TaskMode(
    name="classification", causal_lm=False, labelled=True,
    validate=validate,
    read=read_labelled, num_labels=lambda raw: len(raw[0].label_names), prepare=prepare,
    make_task=make_task, make_evaluator=make_evaluator,
    headline_metric="test_accuracy", higher_is_better=True,
    describe_targets=describe_labels, summarize=summarize_accuracy)
