"""Task ``causal_lm``: a decoder (Llama / Qwen2 / GPT-2) trained on next-token prediction
(every token, or only the response of instruction data); test perplexity is the headline, with
per-client perplexity when the dataset comes with its own clients (Shakespeare's roles)."""

from __future__ import annotations

import numpy as np

from fedlora_jax.driver.modes import TaskData, TaskMode, headline_summary, spread
from fedlora_jax.driver.modes.classification import batches_dict, fail


def validate(cfg) -> None:
    if cfg.partition in ("dirichlet", "shards"):
        fail("partition", cfg.partition, "'iid', 'quantity' or 'natural' for task='causal_lm' (label-skew "
             "partitions need class labels)")
    if cfg.diagnose_first_round:
        fail("diagnose_first_round", True, "False for task='causal_lm' (the diagnostic reports accuracy)")
    if cfg.eval_distributed_ranks:
        fail("eval_distributed_ranks", cfg.eval_distributed_ranks, "() for task='causal_lm' (it reports accuracy)")
    if cfg.rank_order == "label_entropy":
        fail("rank_order", cfg.rank_order, "client_ranks to reorder and a labelled task (not causal_lm)")
    validate_token_loss(cfg)


def validate_token_loss(cfg) -> None:
    """Rules of every task trained on a token loss."""
    if cfg.label_smoothing:
        fail("label_smoothing", cfg.label_smoothing, f"0.0 for task={cfg.task!r} (it smooths class labels; "
             "this task's loss is per token)")
    if cfg.freeze_head:
        fail("freeze_head", cfg.freeze_head, f"False for task={cfg.task!r} (it has no trainable head: the LM head "
             "is the frozen, tied embedding)")


def _natural_clients(cfg):
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


def _texts(cfg):
    """``(train, test, parts, num_groups, test_group)``: the text datasets, and with natural
    clients each client's training rows, the client count and each test text's client."""
    from fedlora_jax import data as data_lib

    parts = num_groups = test_group = None
    if cfg.dataset != "shakespeare":
        text_col = cfg.text_column or None
        train_ds = data_lib.load_causal_lm(cfg.dataset, split=cfg.train_split, text_column=text_col,
                                           max_examples=cfg.train_limit or None)
        test_ds = data_lib.load_causal_lm(cfg.dataset, split=cfg.test_split, text_column=text_col,
                                          max_examples=cfg.test_limit or None)
        return train_ds, test_ds, parts, num_groups, test_group
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
    return train_ds, test_ds, parts, num_groups, test_group


def prepare(cfg, raw, tokenizer, tok_cache) -> TaskData:
    from fedlora_jax import data as data_lib
    from fedlora_jax.data import tokenization as tok_lib

    train_ds, test_ds, parts, num_groups, test_group = _texts(cfg)
    if cfg.lm_loss == "all":
        train_ds, test_ds = (data_lib.CausalLMDataset(d.texts, None) for d in (train_ds, test_ds))
    elif cfg.chat_template:
        train_ds, test_ds = (tok_lib.apply_chat_template(d, tokenizer) for d in (train_ds, test_ds))
    train = data_lib.tokenize(train_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    test = data_lib.tokenize(test_ds, tokenizer, max_length=cfg.max_length, cache_dir=tok_cache)
    ev = data_lib.eval_batches(test, cfg.eval_batch_size)
    batches = batches_dict(ev)
    if test_group is not None:
        rows = np.zeros(ev.example_mask.size, np.int64)
        rows[: len(test_group)] = np.arange(len(test_group))
        batches["group"] = test_group[rows].reshape(ev.example_mask.shape)
    return TaskData(train, batches, None, ["text"], parts=parts, num_groups=num_groups, samples_from=test)


def make_task(graphdef, cfg):
    from fedlora_jax.driver.tasks import causal_lm_task

    return causal_lm_task(graphdef, scale=cfg.scale, remat=cfg.remat)


def make_evaluator(setup):
    """``test_loss`` (mean token NLL), ``test_perplexity``, ``test_token_accuracy`` and, with
    natural clients, ``client_test_perplexity`` / ``client_test_token_accuracy`` (mean, min,
    percentiles over the clients, each on its own test texts)."""
    import jax
    import jax.numpy as jnp

    from fedlora_jax.driver.evaluation import evaluate_global
    from fedlora_jax.driver.tasks import make_lm_evaluate

    test_batches = jax.tree.map(jnp.asarray, setup.test_batches)
    evaluate = make_lm_evaluate(setup.graphdef, scale=setup.cfg.scale, num_groups=setup.num_groups)

    def evaluate_state(st) -> dict:
        res = evaluate_global(setup, st, evaluate, test_batches)
        out = {"test_loss": float(res["nll"]), "test_perplexity": float(res["perplexity"]),
               "test_token_accuracy": float(res["accuracy"])}
        if setup.num_groups is not None:
            out["client_test_perplexity"] = spread(res["group_perplexity"])
            out["client_test_token_accuracy"] = spread(res["group_accuracy"])
        return out

    return evaluate, evaluate_state


def describe_targets(model, data: TaskData) -> str:
    return f"next-token targets over a {model.config.vocab_size}-token vocabulary"


def summarize(initial: dict, evals: list, last: dict) -> dict:
    out = {"task": "causal_lm",
           **headline_summary("test_perplexity", initial, evals, higher_is_better=False),
           "initial_test_token_accuracy": initial.get("test_token_accuracy"),
           "final_test_token_accuracy": evals[-1].get("test_token_accuracy") if evals else None}
    if evals and "client_test_perplexity" in evals[-1]:
        out["final_client_test_perplexity"] = evals[-1]["client_test_perplexity"]
    return out


MODE = TaskMode(
    name="causal_lm", causal_lm=True, labelled=False, validate=validate,
    read=lambda cfg: None, num_labels=lambda raw: None, prepare=prepare,
    make_task=make_task, make_evaluator=make_evaluator,
    headline_metric="test_perplexity", higher_is_better=False, also_show=("test_token_accuracy",),
    describe_targets=describe_targets, summarize=summarize,
    plots=False)
