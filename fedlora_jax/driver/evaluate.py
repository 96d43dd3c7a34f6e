"""Operate on a finished (or interrupted) run directory: evaluate its checkpoint, export PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora_jax import lora as lora_lib
from fedlora_jax.driver import checkpoint as ckpt
from fedlora_jax.driver.config import from_dict


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


def export_run_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Export the global adapter of a run as a PEFT adapter (+ ``head.safetensors`` for an
    encoder classifier; ``task_type="CAUSAL_LM"`` and no head for the LM tasks).

    SVD-form gains ``e`` (FedARA) and global masks are folded into ``b`` (PEFT has no lambda);
    methods that folded updates into the base weights (FedEx-LoRA, FLoRA) cannot be expressed
    as an adapter alone and are refused.
    """
    from safetensors.numpy import save_file

    from fedlora_jax.driver.evaluation import eval_masks
    from fedlora_jax.models.peft_io import export_peft

    setup, state, _ = load_run(run_dir)
    if getattr(state.agg_state, "base_delta", None) is not None:
        raise ValueError(f"algorithm {setup.cfg.algorithm!r} folds updates into the base weights; "
                         "its result is not a pure LoRA adapter and cannot be exported as PEFT")
    masks = eval_masks(setup, state)
    folded = {}
    for k, f in state.lora.items():
        g = lora_lib.effective_gain(f, None if masks is None else masks[k])
        b = f.b if g is None else f.b * g[:, None].astype(f.b.dtype)
        folded[k] = lora_lib.LoraFactors(f.a, b, None)
    lm = setup.cfg.task != "classification"
    out = export_peft(folded, None, scale=setup.cfg.scale, targets=setup.targets, out_dir=out_dir,
                      base_model_name_or_path=setup.cfg.model, task_type="CAUSAL_LM" if lm else "SEQ_CLS",
                      head=None if lm else state.head)
    if lm:  # decoders: no trainable head, the adapter is all there is
        return Path(out)
    head = {"/".join(str(getattr(p, "key", p)) for p in path): np.asarray(v)
            for path, v in _flat(state.head)}
    save_file(head, str(Path(out) / "head.safetensors"))
    return Path(out)


def _flat(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]
