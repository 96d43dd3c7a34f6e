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
