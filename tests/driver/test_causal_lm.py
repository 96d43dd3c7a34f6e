"""Causal-LM fine-tuning: the task's loss masking, perplexity, per-client evaluation and
classification as generation against loop references; the driver and CLI end to end on a tiny
random Llama (char tokenizer with a chat template)."""

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny_llama import write_tiny_llama

from fedlora_jax import lora as lora_lib
from fedlora_jax.cli import main
from fedlora_jax.data import IGNORE_INDEX, CausalLMDataset, tokenize
from fedlora_jax.data import tokenization as tok_lib
from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.driver.run import run_experiment
from fedlora_jax.driver.tasks import causal_lm_task, make_choice_evaluate, make_lm_evaluate
from fedlora_jax.models import from_pretrained, load_tokenizer
from fedlora_jax.models.common import functional_forward, split_for_round

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def parts(tiny_dir):
    model = from_pretrained(tiny_dir)
    graphdef, base, head = split_for_round(model)
    targets = model.adapter_targets(["q_proj", "v_proj"])
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    lora = lora_lib.init(jax.random.key(0), shapes, 4, scheme="a_random_b_zero", std=0.3)
    lora = {k: lora_lib.LoraFactors(f.a, 0.2 * jnp.ones_like(f.b), f.e) for k, f in lora.items()}
    return model, graphdef, base, head, lora, load_tokenizer(tiny_dir)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_token_nll(logits, labels, example_mask):
    """NumPy loop: sum of -log p(label[t+1] | <= t) over counted targets, and their count."""
    lp = _log_softmax(logits)
    tot, n, hit = 0.0, 0, 0
    for b in range(labels.shape[0]):
        if not example_mask[b]:
            continue
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            tot -= lp[b, t, y]
            n += 1
            hit += int(np.argmax(lp[b, t]) == y)
    return tot, n, hit


def _instruction_batch(tok, max_length=40):
    ds = CausalLMDataset(["Q: hi\nA: hello there", "Q: x\nA: yz", "whole text no prompt", "Q: pad row\nA: no"],
                         ["Q: hi\nA:", "Q: x\nA:", "", "Q: pad row\nA:"])
    t = tokenize(ds, tok, max_length=max_length)
    return {"input_ids": jnp.asarray(t.input_ids), "attention_mask": jnp.asarray(t.attention_mask),
            "labels": jnp.asarray(t.labels), "example_mask": jnp.array([1.0, 1.0, 1.0, 0.0])}, ds


def test_loss_counts_only_response_tokens(parts):
    model, graphdef, base, head, lora, tok = parts
    batch, ds = _instruction_batch(tok)
    task = causal_lm_task(graphdef, scale=2.0)
    loss, aux = task.loss({"lora": lora, "head": head}, base, batch, None, None, None)
    logits = functional_forward(graphdef, base, head, batch["input_ids"], batch["attention_mask"], lora=lora,
                                masks=None, scale=2.0)
    tot, n, hit = _ref_token_nll(np.asarray(logits), np.asarray(batch["labels"]), np.asarray(batch["example_mask"]))
    # response tokens only: row 0 " hello there" (12), row 1 " yz" (3), row 2 the whole text minus its
    # first token (19 predicted); the padding row and every prompt token count nothing
    assert n == 12 + 3 + 19
    assert float(aux["count"]) == n and float(aux["correct"]) == hit
    np.testing.assert_allclose(float(loss), tot / n, rtol=TOL)
    # the loss really ignores prompt and padding: counting the prompt tokens would change it
    all_tokens = dict(batch, labels=jnp.where(batch["attention_mask"] > 0, batch["input_ids"], IGNORE_INDEX))
    loss_all, aux_all = task.loss({"lora": lora, "head": head}, base, all_tokens, None, None, None)
    assert float(aux_all["count"]) > n and abs(float(loss_all) - float(loss)) > 1e-4
    # and the prompt's tokens get no gradient through their labels: changing an ignored label is a no-op
    g1 = jax.grad(lambda tr: task.loss(tr, base, batch, None, None, None)[0])({"lora": lora, "head": head})
    moved = dict(batch, input_ids=batch["input_ids"].at[3].set(5))          # the padding row's tokens
    g2 = jax.grad(lambda tr: task.loss(tr, base, moved, None, None, None)[0])({"lora": lora, "head": head})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def _eval_batches(batch, k_batches=2, group=None):
    """Stack the batch twice as ``[K, B, ...]`` (second copy with rows shifted)."""
    out = {k: jnp.stack([v, jnp.roll(v, 1, axis=0)]) for k, v in batch.items()}
    if group is not None:
        out["group"] = jnp.stack([group, jnp.roll(group, 1)])
    return out


def test_perplexity_and_per_client_equal_loops(parts):
    model, graphdef, base, head, lora, tok = parts
    batch, _ = _instruction_batch(tok)
    group = jnp.array([0, 2, 2, 1], jnp.int32)
    ev = _eval_batches(batch, group=group)
    res = make_lm_evaluate(graphdef, scale=2.0, num_groups=3)(base, head, lora, None, ev)
    tot = n = hit = 0
    g_tot, g_n, g_hit = np.zeros(3), np.zeros(3), np.zeros(3)
    for k in range(2):
        b = {key: np.asarray(v[k]) for key, v in ev.items()}
        logits = np.asarray(functional_forward(graphdef, base, head, jnp.asarray(b["input_ids"]),
                                               jnp.asarray(b["attention_mask"]), lora=lora, masks=None, scale=2.0))
        for row in range(b["labels"].shape[0]):
            em = b["example_mask"][row:row + 1]
            t_, n_, h_ = _ref_token_nll(logits[row:row + 1], b["labels"][row:row + 1], em)
            tot, n, hit = tot + t_, n + n_, hit + h_
            g = b["group"][row]
            g_tot[g] += t_
            g_n[g] += n_
            g_hit[g] += h_
    np.testing.assert_allclose(float(res["nll"]), tot / n, rtol=TOL)
    np.testing.assert_allclose(float(res["perplexity"]), np.exp(tot / n), rtol=TOL)
    np.testing.assert_allclose(float(res["accuracy"]), hit / n, rtol=TOL)
    assert float(res["tokens"]) == n
    has = g_n > 0
    np.testing.assert_allclose(np.asarray(res["group_tokens"]), g_n)
    np.testing.assert_allclose(np.asarray(res["group_perplexity"])[has], np.exp(g_tot[has] / g_n[has]), rtol=TOL)
    np.testing.assert_allclose(np.asarray(res["group_accuracy"])[has], g_hit[has] / g_n[has], rtol=TOL)
    assert np.all(np.isnan(np.asarray(res["group_perplexity"])[~has]))


def test_cls_generation_accuracy_equals_loop(parts):
    model, graphdef, base, head, lora, tok = parts
    names = ["sports", "world", "tech"]
    texts = ["a goal was scored", "the summit ended", "new chips ship", "rain all week", "a tie game"]
    y = np.array([0, 1, 2, 1, 0])
    prompts, answers = tok_lib.classification_prompts(texts, names, tok, max_length=96)
    assert answers == [" sports", " world", " tech"]
    choices = tok_lib.tokenize_choices(prompts, answers, tok, max_length=96)
    assert choices.input_ids.shape == (5, 3, 96)
    ids, am, lab = (np.concatenate([x, x[:1]]) for x in choices)        # one padding row: [6, 3, 96]
    ex = np.array([1, 1, 1, 1, 1, 0], np.float32)
    yy = np.concatenate([y, y[:1]])
    batches = {"input_ids": ids.reshape(2, 3, 3, 96), "attention_mask": am.reshape(2, 3, 3, 96),
               "labels": lab.reshape(2, 3, 3, 96), "example_mask": ex.reshape(2, 3),
               "class_labels": yy.reshape(2, 3).astype(np.int32)}
    acc, loss, per_class = make_choice_evaluate(graphdef, scale=2.0, num_classes=3)(
        base, head, lora, None, jax.tree.map(jnp.asarray, batches))
    preds, ces = [], []
    for e in range(5):
        scores = []
        for c in range(3):
            logits = np.asarray(functional_forward(graphdef, base, head, jnp.asarray(ids[e, c][None]),
                                                   jnp.asarray(am[e, c][None]), lora=lora, masks=None, scale=2.0))
            t_, n_, _ = _ref_token_nll(logits, lab[e, c][None], np.ones(1))
            assert n_ == len(tok(answers[c], add_special_tokens=False)["input_ids"])   # answer tokens only
            scores.append(-t_)
        preds.append(int(np.argmax(scores)))
        ces.append(-_log_softmax(np.array(scores))[y[e]])
    preds = np.array(preds)
    np.testing.assert_allclose(float(acc), np.mean(preds == y), rtol=TOL)
    np.testing.assert_allclose(float(loss), np.mean(ces), rtol=1e-4)
    for k in range(3):
        np.testing.assert_allclose(float(per_class[k]), np.mean(preds[y == k] == k), rtol=TOL)


def test_chat_template_wraps_prompts(parts):
    tok = parts[-1]
    ds = CausalLMDataset(["Q: hi\nA: yo"], ["Q: hi\nA:"])
    out = tok_lib.apply_chat_template(ds, tok)
    assert out.prompts == ["<|user|>Q: hi\nA:\n<|assistant|>"]
    assert out.texts == ["<|user|>Q: hi\nA:\n<|assistant|>yo</s>"]
    t = tokenize(out, tok, max_length=48)
    targets = t.labels[0][t.labels[0] != IGNORE_INDEX]
    assert tok.decode(targets.tolist()) == "yo</s>"
    assert tok_lib.apply_chat_template(CausalLMDataset(["plain"]), tok).prompts is None


def _lm_config(model, data, **kw):
    base = dict(name="tiny-lm", model=str(model), dataset=str(data), task="causal_lm", partition="iid",
                max_length=112, num_clients=4, clients_per_round=3, rounds=2, local_steps=2, batch_size=4, r_max=4,
                lora_alpha=8.0, client_ranks=(1, 2, 4), target_modules=("q_proj", "v_proj"), chunk_size=2,
                eval_batch_size=8, lr=5e-3, chat_template=True, generate_samples=2, generate_max_new_tokens=8)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmdata")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    for split, n in (("train", 40), ("test", 8)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"instruction": f"Say {i % 5}",
                                    "output": " ".join(rng.choice(words, size=rng.integers(3, 7)))}) + "\n")
    return d


def test_config_refuses_bad_lm_settings(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="'partition'"):
        ExperimentConfig(task="causal_lm")                          # dirichlet needs labels
    with pytest.raises(ValueError, match="'task'"):
        ExperimentConfig(task="lm")
    with pytest.raises(ValueError, match="'generate_samples'"):
        ExperimentConfig(generate_samples=2)                        # an encoder classifier
    with pytest.raises(ValueError, match="'partition'"):
        ExperimentConfig(task="causal_lm", partition="natural", dataset="sst2")
    with pytest.raises(ValueError, match="needs an encoder classifier"):
        from fedlora_jax.driver.setup import build_setup
        build_setup(ExperimentConfig(model=str(tiny_dir), train_limit=20, test_limit=8, num_clients=2,
                                     clients_per_round=2, target_modules=("q_proj",)), cache_dir=tmp_path, quiet=True)
    assert ExperimentConfig().fingerprint() == ExperimentConfig(task="classification").fingerprint()


def _fake_shakespeare(monkeypatch):
    from typing import NamedTuple

    class RoleClient(NamedTuple):
        play: str
        role: str
        train: list
        test: list

    rng = np.random.default_rng(1)
    words = ["thou", "art", "my", "lord", "fair", "night", "sweet", "prince", "to", "be"]
    line = lambda: " ".join(rng.choice(words, size=rng.integers(4, 9)))
    population = [RoleClient("Hamlet", f"ROLE{i}", [line() for _ in range(6 + 2 * i)], [line() for _ in range(2 + i)])
                  for i in range(5)]
    calls = {}

    def load_role_clients(*, min_lines=64, test_fraction=0.2, seed=0, texts_dir=None, plays=None, max_clients=None,
                          example="speech"):
        calls.update(min_lines=min_lines, max_clients=max_clients)
        return population[:max_clients] if max_clients else list(population)

    def to_causal_lm(clients, split="train"):
        texts, who = [], []
        for c, rc in enumerate(clients):
            for t in getattr(rc, split):
                texts.append(t)
                who.append(c)
        return CausalLMDataset(texts, None), np.asarray(who)

    mod = types.ModuleType("fedlora_jax.data.shakespeare")
    mod.RoleClient, mod.load_role_clients, mod.to_causal_lm = RoleClient, load_role_clients, to_causal_lm
    import fedlora_jax.data as data_pkg
    monkeypatch.setitem(sys.modules, "fedlora_jax.data.shakespeare", mod)
    monkeypatch.setattr(data_pkg, "shakespeare", mod, raising=False)
    return population, calls


def test_shakespeare_natural_clients_per_client_perplexity(tiny_dir, tmp_path, monkeypatch, capsys):
    population, calls = _fake_shakespeare(monkeypatch)
    cfg = _lm_config(tiny_dir, "x", dataset="shakespeare", partition="natural", num_clients=4, clients_per_round=2,
                     max_length=48, rounds=1, lm_loss="all", generate_samples=5, natural_min_lines=3,
                     algorithm="hetlora")
    summary = run_experiment(cfg, tmp_path / "sh", quiet=False, cache_dir=tmp_path / "cache")
    assert calls == {"min_lines": 3, "max_clients": 4}
    # the console: the setup line names what a causal LM predicts (not "0 labels"); a few samples
    # are printed at the end, each part on one line, and the file that holds all of them is named
    err = capsys.readouterr().err
    vocab = json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]
    assert f"next-token targets over a {vocab}-token vocabulary" in err and " labels" not in err
    assert "round   0 [1/1]" in err and "before training: test perplexity" in err
    assert f"== generated samples (3 of 5; all in {tmp_path / 'sh' / 'samples.jsonl'}) ==" in err
    shown = err.split("== generated samples")[1]
    first = summary["samples"][0]
    assert f"  prompt     {' '.join(first['prompt'].split())[:157]}" in shown
    assert shown.count("  generated  ") == 3 and shown.count("  reference  ") == 3
    # the 14 test texts are in client order (2, 3, 4, 5 per client): the sample prompts are spread
    # over them (rows 0, 3, 6, 10, 13), so every client gets one, each with its own text's second
    # half as the reference
    assert [s["client"] for s in summary["samples"]] == [0, 1, 2, 3, 3]
    tests = [t for c in population[:4] for t in c.test]
    for s, row in zip(summary["samples"], (0, 3, 6, 10, 13), strict=True):
        assert s["reference"].strip() and s["reference"].strip() in tests[row]
    rows = [json.loads(x) for x in (tmp_path / "sh" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    spread = last["client_test_perplexity"]
    assert spread["min"] <= spread["p50"] <= spread["max"] and np.isfinite(spread["mean"])
    assert summary["compilations_this_call"] == 1
    assert summary["final_client_test_perplexity"] == spread
    # the partition is one client per role: client c holds exactly role c's training texts
    table = (tmp_path / "sh" / "partition.txt").read_text()
    for c in range(4):
        assert f"{c}" in table and str(len(population[c].train)) in table
    with pytest.raises(ValueError, match="exceeds the 5 Shakespeare roles"):
        run_experiment(_lm_config(tiny_dir, "x", dataset="shakespeare", partition="natural", num_clients=6,
                                  clients_per_round=2), tmp_path / "sh2", quiet=True, cache_dir=tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.smoke
def test_cli_train_resume_samples(tiny_dir, lm_data, tmp_path):
    cfg = _lm_config(tiny_dir, lm_data, rounds=2)
    cfg_path = tmp_path / "lm.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda out: ["train", "--config", str(cfg_path), "--out", str(out), "--quiet"]
    assert main(args(straight)) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["compilations_this_call"] == 1 and summary["rounds_completed"] == 2
    assert summary["final_test_perplexity"] < summary["initial_test_perplexity"]
    samples = [json.loads(x) for x in (straight / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and summary["samples"] == samples
    assert all(s["prompt"].endswith("<|assistant|>") for s in samples)
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [-1, 0, 1]
    assert all(np.isfinite(r["test_perplexity"]) and r["bytes_up"] > 0 for r in rows[1:])
    assert rows[1]["active_ranks"]["layer.0.q_proj"] != [4, 4, 4] or len(set(cfg.client_ranks)) == 1
    # stop after one round, then resume: the same numbers as the straight run
    assert main(args(resumed) + ["--stop-after", "1"]) == 0
    assert not (resumed / "samples.jsonl").exists()
    assert main(args(resumed) + ["--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
    rows2 = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows2) == strip(rows)
    assert [json.loads(x) for x in (resumed / "samples.jsonl").read_text().splitlines()] == samples
    assert main(["eval", str(straight)]) == 0


def test_natural_test_per_client_caps_every_client(tiny_dir, tmp_path, monkeypatch):
    """``natural_test_per_client=n`` keeps the first n held-out texts of EVERY client (not the
    first clients' texts, as ``test_limit`` would)."""
    from fedlora_jax.driver.setup import build_setup

    population, _ = _fake_shakespeare(monkeypatch)
    kw = dict(dataset="shakespeare", partition="natural", num_clients=4, clients_per_round=2, max_length=48,
              rounds=1, lm_loss="all", natural_min_lines=3)
    counts = {}
    for n in (0, 1, 2):
        setup = build_setup(_lm_config(tiny_dir, "x", natural_test_per_client=n, **kw), quiet=True,
                            cache_dir=tmp_path / "cache")
        counts[n] = int(np.sum(np.asarray(setup.test_batches["example_mask"])))
    assert counts[0] == sum(len(c.test) for c in population[:4])
    assert counts[1] == 4 and counts[2] == 8
    with pytest.raises(ValueError, match="natural_test_per_client"):
        _lm_config(tiny_dir, "x", natural_test_per_client=-1, **kw)


def test_sample_rows_spread_over_the_test_set():
    from fedlora_jax.driver.evaluation import sample_rows

    np.testing.assert_array_equal(sample_rows(14, 4), [0, 4, 9, 13])
    np.testing.assert_array_equal(sample_rows(3, 8), [0, 1, 2])
    np.testing.assert_array_equal(sample_rows(10, 1), [0])
    assert sample_rows(5, 0).size == 0


def test_shared_prompt_choice_evaluator_equals_whole_candidates(parts):
    """Scoring each prompt once (prefill + cached decode of each answer) equals scoring every
    candidate whole, with multi-token answers of different lengths and padding rows."""
    from fedlora_jax.driver.tasks import make_shared_prompt_choice_evaluate

    model, graphdef, base, head, lora, tok = parts
    names = ["sports", "world affairs today", "tech"]
    texts = ["a goal was scored", "the summit ended in the capital", "new chips ship", "rain", "a tie game"]
    y = np.array([0, 1, 2, 1, 0], np.int32)
    prompts, answers = tok_lib.classification_prompts(texts, names, tok, max_length=128)
    choices = tok_lib.tokenize_choices(prompts, answers, tok, max_length=128)
    shared = tok_lib.shared_prompt_choices(choices)
    assert shared is not None
    widths = shared.answer_mask.sum(-1)
    assert widths.max() > 1 and len(set(widths.tolist())) > 1        # multi-token answers of different lengths
    for e in range(5):
        for k in range(3):
            n_a = int(widths[k])
            row = choices.input_ids[e, k][choices.attention_mask[e, k] > 0]
            np.testing.assert_array_equal(row, np.concatenate([shared.prompt_ids[e][shared.prompt_mask[e] > 0],
                                                               shared.answer_ids[k, :n_a]]))
    pad = lambda x: np.concatenate([x, x[:1]])                       # one padding row -> [6, ...]
    ex = np.array([1, 1, 1, 1, 1, 0], np.float32).reshape(2, 3)
    yy = pad(y).reshape(2, 3)
    whole = {"input_ids": pad(choices.input_ids).reshape(2, 3, 3, 128),
             "attention_mask": pad(choices.attention_mask).reshape(2, 3, 3, 128),
             "labels": pad(choices.labels).reshape(2, 3, 3, 128), "example_mask": ex, "class_labels": yy}
    p = shared.prompt_ids.shape[1]
    short = {"input_ids": pad(shared.prompt_ids).reshape(2, 3, p), "attention_mask": pad(shared.prompt_mask).reshape(
        2, 3, p), "example_mask": ex, "class_labels": yy}
    ref = make_choice_evaluate(graphdef, scale=2.0, num_classes=3)(base, head, lora, None,
                                                                   jax.tree.map(jnp.asarray, whole))
    got = make_shared_prompt_choice_evaluate(graphdef, scale=2.0, num_classes=3, answer_ids=shared.answer_ids,
                                             answer_mask=shared.answer_mask)(base, head, lora, None,
                                                                             jax.tree.map(jnp.asarray, short))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_shared_prompt_choices_refuses_what_does_not_factor():
    ids = np.array([[[5, 6, 7, 0], [5, 6, 8, 9]]], np.int32)           # [E=1, K=2, T=4]
    am = (ids > 0).astype(np.int32)
    lab = np.where(np.arange(4) >= 2, ids, IGNORE_INDEX)
    lab = np.where(am > 0, lab, IGNORE_INDEX)
    got = tok_lib.shared_prompt_choices(tok_lib.TokenizedDataset(ids, am, lab))
    np.testing.assert_array_equal(got.prompt_ids, [[5, 6]])
    np.testing.assert_array_equal(got.answer_ids, [[7, 0], [8, 9]])
    np.testing.assert_array_equal(got.answer_mask, [[1, 0], [1, 1]])
    merged = ids.copy()
    merged[0, 1, 1] = 4                                                # the candidates' prompts differ
    assert tok_lib.shared_prompt_choices(tok_lib.TokenizedDataset(merged, am, lab)) is None
    two = np.concatenate([ids, ids], 0)
    two[1, 1, 3] = 3                                                   # answer 1 tokenized differently in example 1
    lab2 = np.where((np.arange(4) >= 2) & (two > 0), two, IGNORE_INDEX)
    assert tok_lib.shared_prompt_choices(tok_lib.TokenizedDataset(two, (two > 0).astype(np.int32), lab2)) is None


def test_cls_generation_runs_end_to_end_with_the_shared_prompt_evaluator(tiny_dir, tmp_path):
    """SST-2 as generation on the tiny Llama through the driver: the candidates share their
    prompts, so the evaluation runs the cached scorer; the HAFL diagnostics work on it."""
    from fedlora_jax.driver.setup import build_setup

    cfg = _lm_config(tiny_dir, "sst2", task="cls_generation", partition="dirichlet", train_limit=64, test_limit=12,
                     max_length=128, chat_template=False, generate_samples=0, algorithm="hafl",
                     eval_distributed_ranks=(1,))
    setup = build_setup(cfg, quiet=True, cache_dir=tmp_path / "cache")
    assert setup.choice_answers is not None and setup.test_batches["input_ids"].ndim == 3   # [N, B, P] prompts
    summary = run_experiment(cfg, tmp_path / "cg", quiet=True, cache_dir=tmp_path / "cache")
    assert summary["compilations_this_call"] == 1 and summary["task"] == "cls_generation"
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert set(summary["distributed_test_accuracy"]) == {"1"}
