"""Task ``cls_generation``: classification as generation on a causal LM. The prompt is the text,
the answer its label word; the loss is on the answer only, and the evaluation scores every label
word (test accuracy is the headline, as for ``classification``)."""

from __future__ import annotations

import numpy as np

from fedlora_jax.driver.modes import TaskData, TaskMode
from fedlora_jax.driver.modes.causal_lm import validate_token_loss
from fedlora_jax.driver.modes.classification import (
    accuracy_evaluator,
    batches_dict,
    describe_labels,
    read_labelled,
    summarize_accuracy,
    validate_labelled,
)


def validate(cfg) -> None:
    validate_labelled(cfg)
    validate_token_loss(cfg)


def prepare(cfg, raw, tokenizer, tok_cache) -> TaskData:
    """Prompt + label word per training example; test prompts with every label word as a
    candidate. Candidates sharing their prompt tokens (``shared_prompt_choices``, the usual case)
    are scored from one cached pass of each prompt, else every candidate whole
    (``make_choice_evaluate``); the two give the same scores (tested)."""
    from fedlora_jax import data as data_lib
    from fedlora_jax.data import tokenization as tok_lib

    train_ds, test_ds = raw
    names = list(train_ds.label_names)
    kw = dict(max_length=cfg.max_length, chat_template=cfg.chat_template)
    prompts, answers = tok_lib.classification_prompts(train_ds.texts, names, tokenizer, **kw)
    train_lm = data_lib.CausalLMDataset([p + answers[y] for p, y in zip(prompts, train_ds.labels, strict=True)],
                                        prompts)
    train = data_lib.tokenize(train_lm, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test_prompts, _ = tok_lib.classification_prompts(test_ds.texts, names, tokenizer, **kw)
    choices = tok_lib.tokenize_choices(test_prompts, answers, tokenizer, max_length=cfg.max_length,
                                       cache_dir=tok_cache)
    shared = tok_lib.shared_prompt_choices(choices)
    if shared is None:
        ev, choice_answers = data_lib.eval_batches(choices, cfg.eval_batch_size), None
    else:
        prompts_only = data_lib.TokenizedDataset(shared.prompt_ids, shared.prompt_mask, shared.prompt_ids)
        ev, choice_answers = data_lib.eval_batches(prompts_only, cfg.eval_batch_size), shared[2:]
    labels = np.asarray(test_ds.labels, np.int32)
    rows = np.zeros(ev.example_mask.size, np.int64)
    rows[: len(labels)] = np.arange(len(labels))
    batches = batches_dict(ev)
    batches["class_labels"] = labels[rows].reshape(ev.example_mask.shape)
    true = data_lib.TokenizedDataset(*(x[np.arange(len(labels)), labels] for x in choices))
    return TaskData(train, batches, train_ds.labels, names, samples_from=true, choice_answers=choice_answers)


def make_task(graphdef, cfg):
    from fedlora_jax.driver.tasks import causal_lm_task

    return causal_lm_task(graphdef, scale=cfg.scale, remat=cfg.remat)


def make_evaluator(setup):
    from fedlora_jax.driver.tasks import make_choice_evaluate, make_shared_prompt_choice_evaluate

    n_cls, scale = len(setup.label_names), setup.cfg.scale
    if setup.choice_answers is not None:
        evaluate = make_shared_prompt_choice_evaluate(setup.graphdef, scale=scale, num_classes=n_cls,
                                                      answer_ids=setup.choice_answers[0],
                                                      answer_mask=setup.choice_answers[1])
    else:
        evaluate = make_choice_evaluate(setup.graphdef, scale=scale, num_classes=n_cls)
    return evaluate, accuracy_evaluator(setup, evaluate)


def summarize(initial: dict, evals: list, last: dict) -> dict:
    return {**summarize_accuracy(initial, evals, last), "task": "cls_generation"}


MODE = TaskMode(
    name="cls_generation", causal_lm=True, labelled=True, validate=validate,
    read=read_labelled, num_labels=lambda raw: None, prepare=prepare,
    make_task=make_task, make_evaluator=make_evaluator,
    headline_metric="test_accuracy", higher_is_better=True,
    describe_targets=describe_labels, summarize=summarize)
