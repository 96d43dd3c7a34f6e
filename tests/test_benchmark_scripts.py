"""The benchmark scripts' pure parts: the FLOP formula and the scaling plot's row handling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(BENCH))           # the scripts import _bench_common
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_flops_per_sequence_counts_only_needed_work():
    rb = _load("round_bench")
    h, f, layers, t, r = 384, 1536, 6, 64, 8
    full = rb.model_flops_per_sequence(h, f, layers, t, r, False)
    assert full == rb.model_flops_per_token(h, f, layers, t, r, 2) * t
    first = rb.model_flops_per_sequence(h, f, layers, t, r, True)
    # by hand: the last layer keeps K/V projections (+ value LoRA) for all t tokens, the rest for one
    last_full = rb.model_flops_per_token(h, f, 1, t, r, 2) * t
    kv = t * 4 * 2 * h * h + t * 6 * r * 2 * h
    q_side = 4 * (2 * h * h + 2 * h * f) + 12 * t * h + 6 * r * 2 * h
    assert first == full - last_full + kv + q_side
    assert 0.8 < first / full < 0.9


def test_round_bench_and_plan_share_one_flop_formula():
    from flax import nnx

    from fedlora_jax.models.llama import LlamaConfig, LlamaLM
    from fedlora_jax.plan import core

    rb = _load("round_bench")
    cfg = LlamaConfig(model_type="llama", **core.SHAPES["smollm2-135m"])
    targets = nnx.eval_shape(lambda: LlamaLM(cfg, rngs=nnx.Rngs(0))).adapter_targets(list(rb.LLM_MODULES))
    size = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                num_layers=cfg.num_layers)
    assert rb.llm_model_flops_per_token(size, 256, 8.0) == pytest.approx(core.analytic_flops_per_token(
        cfg, targets, 256, 8.0))
    # the encoder formula by hand: W = 4 h^2 + 2 h F, two h x h modules adapted per layer
    h, f, layers, t, r = 384, 1536, 6, 64, 8
    w, lora = 4 * h * h + 2 * h * f, 2 * r * 2 * h
    assert rb.model_flops_per_token(h, f, layers, t, r, 2) == layers * ((2 * w + 4 * t * h + 2 * lora)
                                                                          + (2 * w + 8 * t * h + 4 * lora))


def _rows(tmp_path, pooling2="cls"):
    rows = [{"kind": "env", "date": "2026-11-25", "cpu": "test cpu", "cores": 2, "jax": "0"}]
    for c, pooling in ((8, "cls"), (32, pooling2)):
        base = dict(size="minilm", pooling=pooling, steps=5, batch=8, seq=64, rank=8, dtype="f32")
        rows.append(dict(system="fedlora_jax (one jit, chunked vmap)", clients=c, client_steps_per_s=8.0, **base))
        rows.append(dict(system="torch+peft sequential", clients=c, client_steps_per_s=4.5))
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_scaling_plot_writes_a_png(tmp_path):
    ps = _load("plot_scaling")
    env, ours, peer = ps.load_rows(_rows(tmp_path))
    assert (len(ours), len(peer), env["cpu"]) == (2, 2, "test cpu")
    png = ps.plot(env, ours, peer)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_plot_refuses_mixed_workloads_and_garbage(tmp_path):
    ps = _load("plot_scaling")
    with pytest.raises(ValueError, match="different workloads"):
        ps.load_rows(_rows(tmp_path, pooling2="mean"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        ps.load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"kind": "env"}) + "\n")
    with pytest.raises(ValueError, match="no rows of ours"):
        ps.load_rows(empty)


def test_peer_peak_rss_is_the_childs_own():
    import sys
    rb = _load("round_bench")
    code = "import time; x = bytearray(80 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.6); print('ok')"
    done, rss = rb.run_with_peak_rss([sys.executable, "-c", code])
    assert done.returncode == 0 and done.stdout.strip() == "ok"
    assert rss is not None and 80 <= rss < 200 < rb.peak_rss_mb()   # its own ~80 MiB, not a copy of us


def test_depth_bench_plan_is_legend_style():
    db = _load("depth_bench")
    plan = db.client_plan([6, 3, 1], 5, 6, 1, 8, 6)
    assert [sum(1 for r in p if r) for p in plan] == [6, 3, 1, 6, 3]     # depths round-robin
    for p, d in zip(plan, [6, 3, 1, 6, 3], strict=True):
        assert all(r == 0 for r in p[:6 - d]) and all(1 <= r <= 8 for r in p[6 - d:])
        assert p == sorted(p) and sum(p) == 6 * d                        # ramp rises toward the output
    assert db.cuts_of(plan) == (0, 3, 5)


@pytest.mark.slow
@pytest.mark.interop
def test_depth_bench_tiny_run(tmp_path):
    """One tiny invocation: ours (dynamic cut, cut_variants) and the depth-aware peer, alternating;
    the variants equal the dynamic cut bit for bit."""
    import subprocess
    import sys
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = tmp_path / "depth.jsonl"
    done = subprocess.run([sys.executable, str(BENCH / "depth_bench.py"), "--size", "tiny", "--clients", "3",
                           "--steps", "1", "--batch", "2", "--seq", "8", "--repeats", "1", "--depths", "2", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["env", "ours", "ours", "peer", "summary"]
    summ = rows[-1]
    assert summ["variants_equal_dynamic_bit_for_bit"] is True
    assert summ["cut_variants"] == [0, 1] and summ["variants_client_steps_per_s"] > 0
    for r in rows[1:4]:
        assert r["client_steps_per_s"] > 0 and len(r["load_avg"]) == 1 and r["load_avg"][0]["before"] is not None
    assert rows[3]["peer_trainable_params"] and rows[3]["peer_process_peak_rss_mb"] > 0
