"""One client's local step, taken apart: loss (forward) and loss + LoRA gradient, per depth.

Usage (CPU, the round benchmark's MiniLM shape; one JSON line per depth)::

    python benchmarks/step_bench.py --layers 6 12
    python benchmarks/step_bench.py --layers 6 12 --norm-barrier off   # no CPU barrier
    python benchmarks/step_bench.py --layers 6 --profile    # + where the gradient step's time goes

``--norm-barrier`` / ``--merged-lora`` (``auto | on | off``, default ``auto``) set the model
config's ``norm_barrier`` / ``merged_lora`` fields; every row records the values the model
resolved them to.

Only public model/task code is used, so the same script runs on older commits (for
before/after figures: ``git worktree add /tmp/old <commit>`` and run it there). On a commit whose
``EncoderConfig`` has no such field the choice goes to the environment variable that commit read
at trace time instead (``FEDLORA_JAX_NORM_BARRIER`` / ``FEDLORA_JAX_MERGED_LORA``; ignored by
commits older still), and the row records the request.

``--profile`` runs the compiled gradient step once under ``jax.profiler`` and attributes each
op's time exclusively (an interval where two ops overlap counts half for each), grouped into
matmuls (by operand shapes) and everything else (by XLA's fusion kind).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import env_meta, time_jit
from flax import nnx

from fedlora_jax import lora as lora_lib
from fedlora_jax.driver.tasks import classification_task
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig
from fedlora_jax.models.common import split_for_round

SWITCHES = {"norm_barrier": "FEDLORA_JAX_NORM_BARRIER", "merged_lora": "FEDLORA_JAX_MERGED_LORA"}


def switch_kwargs(choices: dict[str, str]) -> dict[str, str]:
    """The config fields for ``choices`` (``{"norm_barrier": "off", ...}``); on an older commit
    whose ``EncoderConfig`` lacks a field, set the environment variable it read instead."""
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    kw = {}
    for name, mode in choices.items():
        if name in fields:
            kw[name] = mode
        else:
            os.environ[SWITCHES[name]] = mode
    return kw


def build(layers: int, batch: int, seq: int, rank: int, switches: dict[str, str] | None = None):
    cfg = EncoderConfig(model_type="bert", hidden_size=384, num_layers=layers, num_heads=12,
                        intermediate_size=1536, vocab_size=30522, num_labels=20, **switch_kwargs(switches or {}))
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    graphdef, base, head = split_for_round(model)
    shapes = {k: (t.in_features, t.out_features) for k, t in model.adapter_targets(["query", "value"]).items()}
    lora = jax.tree.map(lambda x: x + 0.01, lora_lib.init(jax.random.key(1), shapes, rank))
    rng = np.random.default_rng(0)
    batch_ = {"input_ids": jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, seq)), jnp.int32),
              "attention_mask": jnp.ones((batch, seq), jnp.int32),
              "labels": jnp.asarray(rng.integers(0, 20, (batch,)), jnp.int32),
              "example_mask": jnp.ones((batch,), jnp.float32)}
    masks = {k: jnp.ones((rank,), jnp.float32) for k in shapes}
    task = classification_task(graphdef, scale=2.0)
    loss = lambda tr, base, b, m: task.loss(tr, base, b, m, None, None)[0]
    resolved = {n: getattr(model.config, n, (switches or {}).get(n, "auto")) for n in SWITCHES}
    return loss, ({"lora": lora, "head": head}, base, batch_, masks), resolved


def _fusion_bodies(hlo: str) -> tuple[dict, dict]:
    calls = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = \S+ fusion\(.*?\), kind=\w+, "
                                                          r"calls=%([\w.\-]+)", hlo)}
    bodies = {m.group(1): (m.group(2), m.group(3))
              for m in re.finditer(r"\n%([\w.\-]+) \((.*?)\) -> .*? \{\n(.*?)\n\}", hlo, re.S)}
    return calls, bodies


def _category(name: str, calls: dict, bodies: dict) -> str:
    params, body = bodies.get(calls.get(name, ""), ("", ""))
    dot = re.search(r"dot\(%?([\w.\-]+), %?([\w.\-]+)\)", body)
    if dot is None:
        return "other: " + re.sub(r"[.\d]+$", "", name)
    shapes = dict(re.findall(r"%?([\w.\-]+) = (\w+\[[\d,]*\])", body))
    shapes.update(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", params))
    return f"matmul {shapes.get(dot.group(1), '?')} x {shapes.get(dot.group(2), '?')}"


def profile(compiled, args) -> dict[str, float]:
    """``{category: ms}`` of one run of ``compiled``, exclusive attribution (see the docstring)."""
    calls, bodies = _fusion_bodies(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1])
    skip = ("ThunkExecutor", "Await", "end:", "Threadpool")
    events = [(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name)
              for plane in data.planes for line in plane.lines if line.name.startswith("tf_XLAEigen")
              for ev in line.events if not any(s in ev.name for s in skip)]
    cuts = sorted({t for s, e, _ in events for t in (s, e)})
    out: collections.Counter = collections.Counter()
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        running = [n for s, e, n in events if s <= a and e >= b]
        for n in running:
            out[_category(n, calls, bodies)] += (b - a) / len(running) / 1e6
    return dict(out.most_common())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[6])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--norm-barrier", choices=["auto", "on", "off"], default="auto",
                   help="the model config's norm_barrier (LayerNorm gradient barrier; auto = on for CPU)")
    p.add_argument("--merged-lora", choices=["auto", "on", "off"], default="auto",
                   help="the model config's merged_lora (float32 LoRA folded into the kernel; auto = on for CPU)")
    p.add_argument("--label", default="", help="a free-text tag stored in every row (e.g. the commit)")
    a = p.parse_args()
    print(json.dumps(env_meta()), flush=True)
    for layers in a.layers:
        loss, args, resolved = build(layers, a.batch, a.seq, a.rank,
                                     {"norm_barrier": a.norm_barrier, "merged_lora": a.merged_lora})
        _, fwd_s, _ = time_jit(loss, args, a.repeats)
        grad = jax.grad(loss)
        compile_s, step_s, _ = time_jit(grad, args, a.repeats)
        row = dict(label=a.label, layers=layers, batch=a.batch, seq=a.seq, rank=a.rank,
                   forward_ms=round(fwd_s * 1e3, 1), forward_backward_ms=round(step_s * 1e3, 1),
                   backward_ms=round((step_s - fwd_s) * 1e3, 1), compile_s=round(compile_s, 2), **resolved)
        if a.profile:
            compiled = jax.jit(grad).lower(*args).compile()
            row["profile_ms"] = {k: round(v, 2) for k, v in profile(compiled, args).items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
