"""`fedlora plan`: the round compiled by XLA:TPU for a TPU topology on this CPU host.

The TPU tests need ``libtpu`` (``pip install "fedlora_jax[tpu-plan]"``) and skip, with that
reason, only where it is not installed; nothing here needs a TPU or the network.
"""

import dataclasses
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.plan import base_partition_spec, core, hlo, parse_mesh

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install "fedlora_jax[tpu-plan]")')

#: Every field of a plan's JSON line for a program that compiled.
FIELDS = {
    "config", "model", "algorithm", "dtype", "topology", "chip", "device_kind", "chips", "mesh", "base_sharding",
    "clients", "steps", "batch", "seq", "chunk", "clients_per_chip", "r_max", "client_state", "adapted_modules", "remat",
    "cut_variants", "hbm_capacity_bytes", "lower_s", "compile_s", "argument_bytes", "temp_bytes", "output_bytes",
    "alias_bytes", "code_bytes", "total_bytes", "hbm_fraction", "fits", "batch_shard_shape", "batch_sharding",
    "base_bytes", "base_bytes_per_chip", "flops_per_chip", "analytic_flops_per_chip", "flops_ratio",
    "xla_cost_analysis_flops", "xla_cost_analysis_optimal_seconds", "unknown_trip_counts", "conditionals",
    "collectives", "collective_bytes_per_chip", "hbm_traffic_bytes_per_chip", "estimate", "date", "versions", "host",
}
ESTIMATE_FIELDS = {"kind", "compute_s", "hbm_s", "collective_s", "round_s", "collective_share", "client_steps_per_s",
                   "chip_source"}


def tiny_config(**kw) -> ExperimentConfig:
    d = dict(name="tiny-llama", model="shape:llama-tiny", task="causal_lm", dataset="shakespeare", partition="natural",
             max_length=32, num_clients=16, clients_per_round=8, local_steps=2, batch_size=2, r_max=8,
             target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), client_ranks=(2, 4, 8), algorithm="fedit",
             chunk_size=8, lr=1e-3, dtype="bfloat16")
    d.update(kw)
    return ExperimentConfig(**d)


def test_hlo_count_multiplies_loop_bodies_by_trip_count():
    n, steps = 64, 7

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=steps)[0]

    text = jax.jit(f).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile().as_text()
    counts = hlo.count(text)
    assert counts.flops == pytest.approx(steps * 2 * n ** 3)
    assert counts.unknown_trip_counts == 0


def test_valid_taps_counts_one_tap_per_output_for_the_batched_matmul_trick():
    # a batch dimension of 2 written as a window of 2 with stride 2 and padding 1: one real tap each
    assert hlo._valid_taps(n=2, w=2, o=2, stride=2, lo=1, ld=1, rd=1) == 2
    # a plain 1-D convolution (valid padding): every tap is real
    assert hlo._valid_taps(n=5, w=3, o=3, stride=1, lo=0, ld=1, rd=1) == 9


def test_parse_mesh():
    assert parse_mesh(None, 8) == {"clients": 8}
    assert parse_mesh("clients=4,model=2", 8) == {"clients": 4, "model": 2}
    assert parse_mesh("model=2", 8) == {"clients": 4, "model": 2}
    with pytest.raises(ValueError, match="multiply to 6"):
        parse_mesh("clients=3,model=2", 8)
    with pytest.raises(ValueError, match="expected"):
        parse_mesh("data=8", 8)


def test_megatron_placement():
    P = jax.sharding.PartitionSpec
    path = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)  # noqa: E731
    assert base_partition_spec(path("layers", "0", "q_proj", "kernel"), (64, 128), 2, "megatron") == P(None, "model")
    assert base_partition_spec(path("layers", "0", "o_proj", "kernel"), (128, 64), 2, "megatron") == P("model", None)
    assert base_partition_spec(path("embed_tokens", "embedding"), (1000, 64), 2, "megatron") == P("model", None)
    assert base_partition_spec(path("layers", "0", "input_norm", "scale"), (64,), 2, "megatron") == P()
    assert base_partition_spec(path("layers", "0", "q_proj", "kernel"), (64, 127), 2, "megatron") == P()
    assert base_partition_spec(path("layers", "0", "q_proj", "kernel"), (64, 128), 1, "megatron") == P()
    # NNX state paths end in "value", which is also BERT's value projection: the module is the name
    # before "kernel" (a row-parallel o_proj once came out column-split through that "value")
    assert base_partition_spec(path("layers", "0", "o_proj", "kernel", "value"), (128, 64), 2,
                               "megatron-spmd") == P("model", None)
    assert base_partition_spec(path("embed_tokens", "embedding", "value"), (1000, 64), 2, "megatron") == P("model", None)
    assert base_partition_spec(path("layers", "0", "value", "kernel", "value"), (64, 64), 2, "megatron") == P(None, "model")
    assert base_partition_spec(path("layers", "0", "output", "kernel", "value"), (256, 64), 2, "megatron") == P("model", None)


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)   # import libtpu -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install .*tpu-plan"):
        core.topology_devices("v5e:2x2")


def test_unknown_generation_is_refused():
    with pytest.raises(ValueError, match="unknown TPU generation"):
        core.chip_of_topology("v9x:2x2")


@needs_libtpu
def test_tiny_llama_round_compiles_for_v5e_2x2_and_fits():
    row = core.plan_round(tiny_config(), "v5e:2x2", progress=None)
    assert row["fits"] and row["total_bytes"] < row["hbm_capacity_bytes"]
    # each of the 4 chips holds C/4 = 2 clients' batch: read from the compiled program's input shardings
    assert row["batch_shard_shape"] == [2, 2, 2, 32]
    # FLOPs read off the compiled program (loops counted) agree with the analytic count; XLA's own
    # cost_analysis counts one loop trip and is far below
    assert 0.9 < row["flops_ratio"] < 1.1, row["flops_ratio"]
    assert row["xla_cost_analysis_flops"] < 0.7 * row["flops_per_chip"]
    assert row["unknown_trip_counts"] == 0
    assert "all-reduce" in row["collectives"]     # the aggregation's mean over the clients axis
    line = json.loads(core.plan_json(row))
    assert FIELDS <= set(line), sorted(FIELDS - set(line))
    assert ESTIMATE_FIELDS <= set(line["estimate"])
    assert "not a measurement" in line["estimate"]["kind"]
    assert line["versions"]["libtpu"]


@needs_libtpu
def test_two_axis_mesh_shards_the_base_and_keeps_clients_on_their_axis():
    row = core.plan_round(tiny_config(), "v5e:2x2", mesh="clients=2,model=2", progress=None)
    assert row["fits"]
    assert row["mesh"] == {"clients": 2, "model": 2}
    assert row["batch_shard_shape"] == [4, 2, 2, 32]          # C/2 clients per clients-group
    assert row["base_bytes_per_chip"] < 0.6 * row["base_bytes"]   # no full copy of the base per chip
    assert 0.9 < row["flops_ratio"] < 1.1, row["flops_ratio"]


@needs_libtpu
def test_host_client_state_leaves_the_population_off_the_chips():
    # FedSA keeps every client's own factors: 64 clients' state on the device vs 8 sampled slices
    cfg = tiny_config(algorithm="fedsa", num_clients=64, client_ranks=(8,))
    rows = {where: core.plan_round(dataclasses.replace(cfg, client_state=where), "v5e:2x2", progress=None)
            for where in ("device", "host")}
    assert rows["device"]["client_state"] == "device" and rows["host"]["client_state"] == "host"
    assert rows["host"]["fits"] and rows["device"]["fits"]
    # the device round holds the population's state (replicated): the host round's arguments are smaller
    assert rows["host"]["argument_bytes"] < rows["device"]["argument_bytes"]
    assert core.plan_round(tiny_config(client_state="host"), "v5e:2x2", progress=None)["client_state"] == "none"


@needs_libtpu
def test_cli_plan_prints_table_and_json(tmp_path, capsys):
    from fedlora_jax.cli import main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert main(["plan", "--config", str(cfg), "--topology", "v5e:2x2", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("TPU plan: tiny-llama")
    assert any("ESTIMATE" in line for line in out)
    assert FIELDS <= set(json.loads(out[-1]))


def test_analytic_flops_match_round_bench_formula():
    from flax import nnx

    from fedlora_jax.models.llama import LlamaConfig, LlamaLM

    cfg = LlamaConfig(model_type="llama", **core.SHAPES["smollm2-135m"])
    model = nnx.eval_shape(lambda: LlamaLM(cfg, rngs=nnx.Rngs(0)))
    targets = model.adapter_targets(["q_proj", "k_proj", "v_proj", "o_proj"])
    d, f, v, t, r = 576, 1536, 49152, 256, 8.0
    hq, hk = 9 * 64, 3 * 64
    w = d * hq + 2 * d * hk + hq * d + 3 * d * f
    lora = r * ((d + hq) + 2 * (d + hk) + (hq + d))
    want = 30 * ((2 * w + 4 * t * hq + 2 * lora) + (2 * w + 8 * t * hq + 4 * lora)) + 4 * d * v
    assert core.analytic_flops_per_token(cfg, targets, t, r) == pytest.approx(want)
    assert np.isfinite(want)


@needs_libtpu
def test_a_refused_program_reports_the_compiler_words_and_what_to_change(monkeypatch):
    words = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 17.30G of 15.75G hbm. "
             "Exceeded hbm capacity by 1.55G.")

    def refuse(self, *a, **k):
        raise RuntimeError(words)

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    row = core.plan_round(tiny_config(chunk_size=8), "v5e:2x2", progress=None)
    assert row["fits"] is False and row["error"].startswith("RESOURCE_EXHAUSTED")
    advice = " ".join(row["advice"])
    assert "chunk_size" in advice and "remat" in advice and "model axis" in advice
    assert "DOES NOT FIT" in core.format_plan(row)


def test_table_script_renders_fitting_and_refused_rows(tmp_path):
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("tpu_plan_bench", bench / "tpu_plan.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    common = dict(set="weak", shape="smollm2-135m", topology="v5e:2x2", mesh={"clients": 4}, clients=8,
                  clients_per_chip=2.0, steps=2, batch=4, seq=256, compile_s=140.0, base_sharding="replicated")
    ok = dict(common, fits=True, total_bytes=1.9e9, hbm_capacity_bytes=17.18e9, flops_per_chip=2.46e12,
              flops_ratio=0.998, collective_bytes_per_chip=7e6,
              estimate=dict(round_s=0.026, client_steps_per_s=617.0, collective_share=0.001))
    refused = dict(common, fits=False, error="RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps(refused) + "\n")
    lines = mod.table(path).splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---")
    assert "| yes |" in lines[2] and "does not fit: RESOURCE_EXHAUSTED" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@needs_libtpu
def test_megatron_shard_maps_remove_the_activation_all_gathers_of_the_low_rank_path():
    # Same placement of the base on "model"; "megatron-spmd" leaves the partitioning to XLA, which
    # adds the split base product to the whole low-rank path by all-gathering the activations
    # before forward matmuls; "megatron" runs each split linear as an explicit shard_map with the
    # LoRA factors split like the kernel (fedlora_jax.models.parallel).
    rows = {mode: core.plan_round(tiny_config(), "v5e:2x2", mesh="clients=2,model=2", base_sharding=mode,
                                  progress=None, keep_hlo=True) for mode in ("megatron", "megatron-spmd")}

    def forward_matmul_gathers(row):
        return sum(n for (kind, op, _), (n, _) in hlo.collectives_by_op(row["hlo_text"]).items()
                   if kind == "all-gather" and op.endswith("jvp()/dot_general"))

    assert forward_matmul_gathers(rows["megatron-spmd"]) > 0
    assert forward_matmul_gathers(rows["megatron"]) == 0
    assert rows["megatron"]["collective_bytes_per_chip"] < rows["megatron-spmd"]["collective_bytes_per_chip"]
    assert all(r["fits"] and 0.9 < r["flops_ratio"] < 1.1 for r in rows.values())
