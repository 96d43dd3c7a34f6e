"""Operate on a finished (or interrupted) run directory: evaluate its checkpoint, export PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora_jax import lora as lora_lib
from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.driver import checkpoint as ckpt
from fedlora_jax.driver.config import from_dict

EXPORT_INFO = "fedlora_export.json"
HEAD_FILE = "head.safetensors"


def load_run(run_dir: str | Path, *, quiet: bool = True):
    """Rebuild a run's setup from its ``config.json`` and restore its latest checkpoint.

    Returns ``(setup, state, round_idx)``.
    """
    from fedlora_jax.driver.setup import build_setup, init_state

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a run directory?")
    cfg = from_dict(json.loads(cfg_path.read_text()))
    setup = build_setup(cfg, quiet=quiet)
    r, state, _ = ckpt.restore(run_dir / "checkpoints", init_state(setup), fingerprint=cfg.fingerprint())
    return setup, state, r


def evaluate_run(run_dir: str | Path) -> dict:
    """Test metrics of the run's latest checkpoint: ``test_accuracy`` and ``test_loss``
    (classification tasks) or ``test_loss`` (token NLL), ``test_perplexity`` and
    ``test_token_accuracy`` (causal LM)."""
    setup, state, r = load_run(run_dir)
    metrics = setup.mode.make_evaluator(setup)[1](state)
    return {"run": str(run_dir), "round": r, **{k: v for k, v in metrics.items() if not k.startswith("client_")}}


def _base_source(model_name: str) -> tuple[str, str | None]:
    """``(directory transformers loads, gguf file name or None)`` of a run's ``cfg.model``."""
    from fedlora_jax.models.loading import resolve_gguf_file, resolve_model_dir

    gguf = resolve_gguf_file(model_name)
    if gguf is not None:
        return str(gguf.resolve().parent), gguf.name
    return str(resolve_model_dir(model_name).resolve()), None


def encoder_export_kind(model_config) -> tuple[str, str, str | None]:
    """``(peft task type, transformers auto class, pooling)`` that reproduce an encoder classifier.

    BERT pooling with its pooler: ``("SEQ_CLS", "AutoModelForSequenceClassification", None)``
    (``BertForSequenceClassification`` pools the same way). Otherwise the bare encoder,
    ``("FEATURE_EXTRACTION", "AutoModel", pooling)`` with ``pooling`` ``"mean"`` (over
    ``attention_mask``), ``"first_token"`` or ``"pooler_output"`` (RoBERTa's pooler: its
    ``*ForSequenceClassification`` has another head) to apply to the ``AutoModel`` output.
    """
    if model_config.pooling == "pooler" and model_config.model_type == "bert":
        return "SEQ_CLS", "AutoModelForSequenceClassification", None
    pooling = {"mean": "mean", "cls": "first_token", "pooler": "pooler_output"}[model_config.pooling]
    return "FEATURE_EXTRACTION", "AutoModel", pooling


def export_run_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Export the global adapter of a run as a PEFT adapter that reproduces the run in
    ``peft`` + ``transformers`` where a user loads it.

    What is written depends on the model family and pooling (``fedlora_export.json`` says which,
    with the base model's local directory and ``max_length``; README "Using an exported adapter"
    shows the loading code, tested to give ``fedlora eval``'s logits / loss):

    * encoder (BERT/RoBERTa/MiniLM) pooling by ``"mean"`` or ``"cls"`` (MiniLM, the quickstart:
      mean, as sentence-transformers does), or RoBERTa with ``"pooler"``: a
      ``FEATURE_EXTRACTION`` adapter for ``AutoModel`` + ``head.safetensors``
      (``classifier.weight [K, D]``, ``classifier.bias [K]``); the user pools ``last_hidden_state``
      (mean over ``attention_mask``, first token, or ``pooler_output``) and applies the head.
      ``*ForSequenceClassification`` would pool with BERT's pooler, which such a run never
      trained (wrong predictions), so the adapter's module paths are those of the bare encoder:
      ``PeftModel.from_pretrained`` onto a ``*ForSequenceClassification`` model fails loudly.
    * BERT with ``pooling="pooler"``: a ``SEQ_CLS`` adapter with the classifier in
      ``modules_to_save``: ``BertForSequenceClassification`` + peft gives our logits
      (``head.safetensors`` is written too).
    * causal LMs (Llama/Qwen2/GPT-2, also from GGUF): a ``CAUSAL_LM`` adapter for
      ``AutoModelForCausalLM`` (``gguf_file=`` for a GGUF model), no head.

    ``adapter_config.json``'s ``base_model_name_or_path`` is the base model's local directory.
    SVD-form gains ``e`` (FedARA) and global masks are folded into ``b`` (PEFT has no lambda).

    Raises:
      ValueError: (one line, with what to do) methods that folded updates into the base weights
        (FedEx-LoRA, FLoRA): the result is not a LoRA adapter alone.
    """
    from safetensors.numpy import save_file

    from fedlora_jax.driver.evaluation import eval_masks
    from fedlora_jax.models.peft_io import export_peft

    setup, state, _ = load_run(run_dir)
    cfg = setup.cfg
    if getattr(state.agg_state, "base_delta", None) is not None:
        raise ValueError(f"cannot export {run_dir}: algorithm {cfg.algorithm!r} folds updates into the base "
                         "weights, so no LoRA adapter alone reproduces it; train with a method that keeps a pure "
                         "adapter (e.g. fedit, replication, hetlora) to export it for peft")
    masks = eval_masks(setup, state)
    folded = {}
    for k, f in state.lora.items():
        g = lora_lib.effective_gain(f, None if masks is None else masks[k])
        b = f.b if g is None else f.b * g[:, None].astype(f.b.dtype)
        folded[k] = lora_lib.LoraFactors(f.a, b, None)
    base_dir, gguf_file = _base_source(cfg.model)
    info = {"fedlora_run": str(Path(run_dir).resolve()), "task": cfg.task, "base_model": base_dir,
            "gguf_file": gguf_file, "max_length": cfg.max_length, "label_names": list(setup.label_names)}
    if setup.mode.causal_lm:   # decoders: no trainable head, the adapter is all there is
        out = export_peft(folded, None, scale=cfg.scale, targets=setup.targets, out_dir=out_dir,
                          base_model_name_or_path=base_dir, task_type="CAUSAL_LM")
        info.update(task_type="CAUSAL_LM", auto_class="AutoModelForCausalLM", pooling=None)
    else:
        task_type, auto_class, pooling = encoder_export_kind(setup.model.config)
        out = export_peft(folded, None, scale=cfg.scale, targets=setup.targets, out_dir=out_dir,
                          base_model_name_or_path=base_dir, task_type=task_type,
                          head=state.head if task_type == "SEQ_CLS" else None)
        info.update(task_type=task_type, pooling=pooling, auto_class=auto_class, head=HEAD_FILE)
        cls = state.head.to_pure_dict() if hasattr(state.head, "to_pure_dict") else state.head
        cls = (cls["head"] if "classifier" not in cls else cls)["classifier"]
        save_file({"classifier.weight": np.ascontiguousarray(np.asarray(cls["kernel"], np.float32).T),
                   "classifier.bias": np.asarray(cls["bias"], np.float32)}, str(Path(out) / HEAD_FILE))
    atomic_write_bytes(Path(out) / EXPORT_INFO, (json.dumps(info, indent=1) + "\n").encode())
    return Path(out)
