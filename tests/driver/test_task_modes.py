"""Task modes: the registry, and a toy task added through it alone (no driver file touched) that
trains, evaluates, logs and summarizes end to end on a tiny random BERT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers.tiny_bert import write_tiny_bert, write_tiny_sentiment

from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.driver.modes import (
    TaskMode,
    get_task_mode,
    register_task_mode,
    task_modes,
    unregister_task_mode,
)
from fedlora_jax.driver.modes import classification as cls_mode
from fedlora_jax.driver.run import run_experiment
from fedlora_jax.driver.tasks import _train_forward
from fedlora_jax.federated import Task


def brier_task(graphdef, cfg) -> Task:
    """The toy task's loss: the Brier score (squared error of the softmax against the one-hot
    label) instead of cross-entropy."""
    forward = _train_forward(graphdef, scale=cfg.scale, remat=cfg.remat)

    def loss(trainable, base, batch, masks, grad_cut, key):
        del key
        logits = forward(trainable, base, batch, masks, grad_cut).astype(jnp.float32)
        err = jax.nn.softmax(logits) - jax.nn.one_hot(batch["labels"], logits.shape[-1])
        ex = batch["example_mask"].astype(jnp.float32)
        n = jnp.sum(ex)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * ex)
        return jnp.sum(jnp.sum(err**2, -1) * ex) / jnp.maximum(n, 1.0), {"correct": correct, "count": n}

    return Task(loss=loss, add_base_delta=cls_mode.make_task(graphdef, cfg).add_base_delta)


BRIER = dataclasses.replace(cls_mode.MODE, name="brier_classification", make_task=brier_task)


@pytest.fixture
def brier_registered():
    register_task_mode(BRIER)
    yield BRIER
    unregister_task_mode(BRIER.name)


def test_builtin_modes_and_errors():
    assert set(task_modes()) >= {"classification", "causal_lm", "cls_generation"}
    assert get_task_mode("causal_lm").causal_lm and not get_task_mode("classification").causal_lm
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known: \["):
        get_task_mode("nope")
    with pytest.raises(ValueError, match="'task' = 'brier_classification' is invalid"):
        ExperimentConfig(task="brier_classification")          # not registered: refused by the config
    with pytest.raises(ValueError, match="already registered"):
        register_task_mode(get_task_mode("classification"))
    with pytest.raises(TypeError, match="takes a TaskMode"):
        register_task_mode("classification")
    with pytest.raises(ValueError, match="built in"):
        unregister_task_mode("classification")


def test_headline_and_summary_line():
    mode = get_task_mode("causal_lm")
    assert mode.headline({"test_perplexity": 12.5, "test_token_accuracy": 0.25}) == (
        "test perplexity 12.5000, test token accuracy 0.2500")
    s = {"initial_test_perplexity": 20.0, "final_test_perplexity": 10.0, "best_test_perplexity": 9.0}
    assert mode.summary_line(s) == "test perplexity     20.0000 (untrained) -> 10.0000 (best 9.0000)"
    summary = mode.summarize({"test_perplexity": 20.0}, [{"test_perplexity": 9.0}, {"test_perplexity": 10.0}], {})
    assert summary["best_test_perplexity"] == 9.0 and summary["final_test_perplexity"] == 10.0


def test_toy_task_through_the_registry_runs_end_to_end(brier_registered, tmp_path, capsys):
    model = write_tiny_bert(tmp_path / "bert")
    data = write_tiny_sentiment(tmp_path / "data")
    base = dict(model=str(model), dataset=str(data), max_length=16, num_clients=4, clients_per_round=2, rounds=2,
                local_steps=2, batch_size=4, partition="iid", r_max=4, eval_batch_size=8, lr=1e-2)
    toy = run_experiment(ExperimentConfig(task="brier_classification", **base), tmp_path / "toy",
                         cache_dir=tmp_path / "cache")
    ref = run_experiment(ExperimentConfig(**base), tmp_path / "ref", quiet=True, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "setup: task brier_classification" in err and "2 labels" in err
    assert toy["rounds_completed"] == ref["rounds_completed"] == 2 and toy["compilations_this_call"] == 1
    assert set(toy) >= {"initial_test_accuracy", "final_test_accuracy", "best_test_accuracy"}
    rows = [json.loads(x) for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [-1, 0, 1]
    # Its own loss trained it: the same data, sampling and initialisation with cross-entropy give
    # another training loss (a Brier score is at most 2; a cross-entropy of 2 classes starts near 0.69).
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == ref_rows[0]                                 # the same model before training
    assert abs(rows[1]["train_loss"] - ref_rows[1]["train_loss"]) > 1e-3


def test_optimizer_is_a_config_field():
    from fedlora_jax.driver.config import make_optimizer

    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 0.5)}
    for name, options, want in (("sgd", {}, optax.sgd(0.1)), ("adamw", {"b1": 0.5}, optax.adamw(0.1, b1=0.5, weight_decay=0.0)),
                                ("sgd", {"momentum": 0.9}, optax.sgd(0.1, momentum=0.9))):
        opt = make_optimizer(ExperimentConfig(optimizer=name, optimizer_options=options, lr=0.1))
        got, _ = opt.update(grads, opt.init(params), params)
        ref, _ = want.update(grads, want.init(params), params)
        assert jnp.allclose(got["w"], ref["w"]), name
    for bad, match in (({"optimizer": "adamx"}, "did you mean 'adam'"),
                       ({"optimizer_options": {"learning_rate": 1.0}}, "set the config field 'lr'"),
                       ({"optimizer_options": {"b1": [0.9]}}, "plain values"),
                       ({"optimizer": "sgd", "weight_decay": 0.01}, "takes no weight_decay")):
        with pytest.raises(ValueError, match=match):
            ExperimentConfig(**bad)
    # a new field at its default keeps old checkpoints' fingerprints; a changed one changes it
    assert ExperimentConfig(optimizer="adamw").fingerprint() == ExperimentConfig().fingerprint()
    assert ExperimentConfig(optimizer="sgd").fingerprint() != ExperimentConfig().fingerprint()


def test_label_smoothing_reaches_the_loss():
    from flax import nnx

    from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
    from fedlora_jax.models.common import split_for_round

    model = EncoderClassifier(EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                            intermediate_size=64, max_position_embeddings=16, num_labels=3),
                              rngs=nnx.Rngs(0))
    graphdef, base, head = split_for_round(model)
    head = jax.tree.map(lambda x: 50.0 * x, head)   # confident logits: smoothing then matters
    nnx.update(model, head)
    batch = {"input_ids": jnp.arange(16).reshape(2, 8), "attention_mask": jnp.ones((2, 8), jnp.int32),
             "labels": jnp.array([0, 2]), "example_mask": jnp.ones(2)}
    losses = {ls: float(cls_mode.make_task(graphdef, ExperimentConfig(label_smoothing=ls)).loss(
        {"head": head, "lora": None}, base, batch, None, None, None)[0]) for ls in (0.0, 0.3)}
    logits = model(batch["input_ids"], batch["attention_mask"])
    want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(batch["labels"], 3), 0.3))
    assert abs(losses[0.3] - float(want.mean())) < 1e-5 and abs(losses[0.3] - losses[0.0]) > 1e-3
    with pytest.raises(ValueError, match="'label_smoothing' = 1.5 is invalid"):
        ExperimentConfig(label_smoothing=1.5)
    with pytest.raises(ValueError, match="0.0 for task='cls_generation'"):
        ExperimentConfig(task="cls_generation", label_smoothing=0.1)


def test_every_builtin_mode_is_a_taskmode():
    for mode in task_modes().values():
        assert isinstance(mode, TaskMode)
