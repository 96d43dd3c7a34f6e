"""Every algorithm runs end to end through the driver and the one compiled round on a tiny
random-weight BERT (real loading code, real tokenizer, real SST-2 rows), reporting accuracy,
bytes, simulated time and energy per round."""

import dataclasses
import json

import numpy as np
import pytest
from helpers.tiny_bert import write_tiny_bert

from fedlora_jax.data.loading import load_text_classification
from fedlora_jax.driver.config import ALGORITHMS, ExperimentConfig
from fedlora_jax.driver.run import run_experiment


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


def tiny_config(model, algorithm, **kw):
    base = dict(name=f"tiny-{algorithm}", model=model, dataset="sst2", max_length=16, train_limit=200,
                test_limit=40, num_clients=4, clients_per_round=3, rounds=3, local_steps=2, batch_size=4,
                r_max=4, lora_alpha=8.0, client_ranks=(1, 2, 4), algorithm=algorithm, chunk_size=2,
                eval_batch_size=20, target_modules=("query", "value"),
                device_mix=("jetson_agx_orin_64gb", "raspberry_pi_5_8gb"), lr=5e-3)
    base.update(kw)
    return ExperimentConfig(**base)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs_end_to_end(algorithm, tiny_model, tmp_path):
    algo = {"fedara": {"target_rank": 1}, "adalora": {"target_rank": 1}}.get(algorithm, {})
    cfg = tiny_config(tiny_model, algorithm, algo=algo)
    summary = run_experiment(cfg, tmp_path / algorithm, quiet=True, cache_dir=tmp_path / "cache")
    assert summary["rounds_completed"] == 3
    assert summary["compilations_this_call"] == 1
    rows = [r for r in _rows(tmp_path / algorithm) if r["round"] >= 0]
    test_labels = load_text_classification("sst2", split=cfg.test_split, max_examples=cfg.test_limit).labels
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1
        assert r["bytes_up"] > 0 and r["sim_round_time_s"] > 0 and r["sim_energy_j"] > 0
        assert 0 <= r["client_test_accuracy"]["min"] <= r["client_test_accuracy"]["mean"] <= 1
        # the per-class accuracies, weighted by the test set's class counts, give the accuracy
        per_class = np.array([np.nan if a is None else a for a in r["test_class_accuracy"]])
        counts = np.bincount(test_labels, minlength=len(per_class))
        assert np.isnan(per_class).tolist() == (counts == 0).tolist()
        np.testing.assert_allclose(np.nansum(per_class * counts) / counts.sum(), r["test_accuracy"], atol=1e-6)
    assert summary["total_energy_j"] > 0


def test_fedara_masks_shrink_nested_and_bytes_drop(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "fedara", rounds=6, client_ranks=(), algo={"target_rank": 1, "t_init_frac": 0.0,
                                                                             "t_final_frac": 0.2})
    run_experiment(cfg, tmp_path / "fa", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "fa") if r["round"] >= 0]
    budgets = [sum(r["global_ranks"].values()) for r in rows]
    assert budgets == sorted(budgets, reverse=True), budgets      # nested: never grows
    assert budgets[-1] == len(rows[-1]["global_ranks"]) * 1      # reaches n_modules * target_rank
    per_client_up = [r["bytes_up"] / max(1, len([w for w in r["client_bytes_up"] if w > 0])) for r in rows]
    assert per_client_up[-1] < per_client_up[0]


def test_legend_gives_weaker_devices_fewer_layers(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "legend", client_ranks=(), num_clients=4, clients_per_round=4,
                      device_mix=("datacenter_h100_sxm", "raspberry_pi_5_8gb"))
    run_experiment(cfg, tmp_path / "lg", quiet=True, cache_dir=tmp_path / "cache")
    r = [r for r in _rows(tmp_path / "lg") if r["round"] >= 0][0]
    # clients 0, 2 are H100s, 1, 3 Raspberry Pis (device_mix round-robin)
    assert r["client_device"] == [cfg.device_mix[c % 2] for c in r["clients"]]
    total = lambda c: sum(v[c] for v in r["active_ranks"].values())
    assert total(0) >= total(1) and total(2) >= total(3)


def test_hafl_freeze_keeps_full_forward_and_updates_r_k(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "hafl")
    run_experiment(cfg, tmp_path / "hf", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "hf") if r["round"] >= 0]
    for r in rows:
        ranks = dict(zip(r["clients"], np.array(list(r["active_ranks"].values())).T.tolist(), strict=True))
        for c, rr in ranks.items():
            assert set(rr) == {(1, 2, 4)[c % 3]}   # each client updates exactly its r_k components


def test_dropout_and_deadline_exclusions_reported(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "fedit", dropout_prob=0.5, rounds=3)
    run_experiment(cfg, tmp_path / "dp", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "dp") if r["round"] >= 0]
    assert sum(r["dropped_failure"] for r in rows) > 0
    cfg2 = dataclasses.replace(cfg, dropout_prob=0.0, deadline_s=1e-6)
    run_experiment(cfg2, tmp_path / "dl", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "dl") if r["round"] >= 0]
    assert all(r["dropped_deadline"] == 3 for r in rows)


def test_byun_lee_quality_groups_ranks_and_first_round_diagnostic(tiny_model, tmp_path):
    """Client groups of different data quality carry their own Dirichlet alpha and rank; the
    first-round diagnostic reports the high-rank client's accuracy before and after aggregation."""
    cfg = tiny_config(tiny_model, "replication", client_ranks=(), num_clients=4, clients_per_round=4, rounds=2,
                      partition="dirichlet", client_groups=((1, 100.0, 4), (3, 0.05, 1)), diagnose_first_round=True)
    run_experiment(cfg, tmp_path / "bl", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "bl") if r["round"] >= 0]
    ranks = [sum(v[c] for v in rows[0]["active_ranks"].values()) / len(rows[0]["active_ranks"]) for c in range(4)]
    assert ranks == [4, 1, 1, 1]                       # group 0 (client 0) at rank 4, group 1 at rank 1
    diag = rows[0]["first_round_diagnostic"]
    assert diag["client"] == 0 and diag["rank"] == 4
    assert 0 <= diag["local_accuracy"] <= 1 and 0 <= diag["after_aggregation_accuracy"] <= 1
    assert "first_round_diagnostic" not in rows[1]
    from fedlora_jax.driver.setup import classification_partition_table

    assert classification_partition_table(cfg) + "\n" == (tmp_path / "bl" / "partition.txt").read_text()


def test_client_groups_partition_balance():
    from fedlora_jax.driver.setup import _client_ranks, _partition_clients

    labels = np.repeat(np.arange(4), 500)
    cfg = ExperimentConfig(num_clients=10, clients_per_round=2, partition="dirichlet", r_max=16,
                           client_groups=((2, 50.0, 16), (8, 0.1, 4)))
    parts, group = _partition_clients(cfg, labels)
    assert group.tolist() == [0, 0] + [1] * 8
    assert _client_ranks(cfg, group, None).tolist() == [16, 16] + [4] * 8
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))   # a partition of all rows

    def skew(p):
        h = np.bincount(labels[p], minlength=4) / len(p)
        return float(np.max(h))

    assert max(skew(p) for p in parts[:2]) < min(skew(p) for p in parts[2:])
    with pytest.raises(ValueError, match="client_groups"):
        ExperimentConfig(num_clients=10, clients_per_round=2, client_groups=((2, 1.0, 4),))
    with pytest.raises(ValueError, match="client_groups"):
        ExperimentConfig(num_clients=2, clients_per_round=2, client_groups=((2, 1.0, 4),), client_ranks=(2,))


def test_rank_order_label_entropy_puts_high_ranks_on_balanced_clients():
    from fedlora_jax.driver.setup import _client_ranks, ranks_by_label_entropy

    hist = np.array([[10, 0, 0], [5, 5, 0], [3, 3, 4], [9, 1, 0], [4, 3, 3]])
    # a loop reference: entropy per client, clients sorted by it (largest first, ties by index)
    ent = []
    for h in hist:
        p = h / h.sum()
        ent.append(-sum(x * np.log(x) for x in p if x > 0))
    order = sorted(range(len(hist)), key=lambda c: (-ent[c], c))
    ranks = np.array([2, 2, 4, 4, 8])
    want = np.zeros(5, int)
    for pos, c in enumerate(order):
        want[c] = sorted(ranks, reverse=True)[pos]
    got = ranks_by_label_entropy(ranks, hist)
    assert got.tolist() == want.tolist() == [2, 4, 8, 2, 4]
    assert sorted(got.tolist()) == sorted(ranks.tolist())              # the same ranks, reassigned
    tie = ranks_by_label_entropy(np.array([1, 2, 3]), np.array([[1, 1], [1, 1], [2, 0]]))
    assert tie.tolist() == [3, 2, 1]                                   # ties: the lower index first
    cfg = ExperimentConfig(num_clients=5, clients_per_round=2, r_max=8, client_ranks=(2, 2, 4, 4, 8),
                           rank_order="label_entropy")
    assert _client_ranks(cfg, np.zeros(5, int), hist).tolist() == want.tolist()
    assert _client_ranks(dataclasses.replace(cfg, rank_order="given"), np.zeros(5, int), hist).tolist() == [2, 2, 4, 4, 8]
    with pytest.raises(ValueError, match="rank_order"):
        ExperimentConfig(num_clients=5, clients_per_round=2, rank_order="entropy")
    with pytest.raises(ValueError, match="rank_order"):
        ExperimentConfig(num_clients=5, clients_per_round=2, rank_order="label_entropy")   # no client_ranks


def test_rank_order_label_entropy_through_the_driver(tiny_model, tmp_path):
    """The driver reorders the ranks by the clients' real label histograms (partition.txt)."""
    cfg = tiny_config(tiny_model, "hetlora", client_ranks=(1, 1, 2, 4), num_clients=4, clients_per_round=4,
                      rounds=1, partition="dirichlet", dirichlet_alpha=0.3, rank_order="label_entropy")
    run_experiment(cfg, tmp_path / "re", quiet=True, cache_dir=tmp_path / "cache")
    row = next(r for r in _rows(tmp_path / "re") if r["round"] == 0)
    got = [max(v[c] for v in row["active_ranks"].values()) for c in range(4)]
    table = (tmp_path / "re" / "partition.txt").read_text().splitlines()[2:6]
    hist = np.array([[int(x) for x in line.split()[2:]] for line in table])
    from fedlora_jax.driver.setup import ranks_by_label_entropy

    assert got == ranks_by_label_entropy(np.array([1, 1, 2, 4]), hist).tolist()
    assert got != [1, 1, 2, 4]                     # this split's most balanced client is not client 3
    # the table is reproducible from the config alone (experiments/write_partitions.py)
    from fedlora_jax.driver.setup import classification_partition_table

    assert classification_partition_table(cfg) + "\n" == (tmp_path / "re" / "partition.txt").read_text()


def test_fedara_static_cut_same_numbers_one_compile_per_cut(tiny_model, tmp_path):
    """``static_cut``: the driver compiles one round per lowest active layer (the backward pass
    below it is removed statically) and the run's numbers equal the dynamic cut's."""
    algo = {"target_rank": 1, "t_init_frac": 0.0, "t_final_frac": 0.2, "r_min": 2}
    base = tiny_config(tiny_model, "fedara", rounds=5, client_ranks=(), algo=algo, target_modules=("query",))
    dyn = run_experiment(base, tmp_path / "dyn", quiet=True, cache_dir=tmp_path / "cache")
    sta = run_experiment(dataclasses.replace(base, algo=dict(algo, static_cut=True)), tmp_path / "sta", quiet=True,
                         cache_dir=tmp_path / "cache")
    rows_d = [r for r in _rows(tmp_path / "dyn") if r["round"] >= 0]
    rows_s = [r for r in _rows(tmp_path / "sta") if r["round"] >= 0]
    cuts = {min(r["grad_cut"]) for r in rows_s}
    assert len(cuts) >= 2                                   # the lowest active layer moved up
    assert dyn["compilations_this_call"] == 1
    assert sta["compilations_this_call"] == len(cuts)
    np.testing.assert_allclose([r["train_loss"] for r in rows_s], [r["train_loss"] for r in rows_d], rtol=2e-5)


def _numbers(out):
    keys = ("train_loss", "test_accuracy", "active_ranks", "grad_cut", "bytes_up")
    return [{k: r.get(k) for k in keys} for r in _rows(out)]


def test_cut_variants_and_host_client_state_change_no_number(tiny_model, tmp_path):
    """The engine fields give the same metrics as the default engine, with one compile:
    ``cut_variants`` on LEGEND's mixed depths, ``client_state="host"`` on FedSA's local factors."""
    legend = tiny_config(tiny_model, "legend", client_ranks=(), num_clients=4, clients_per_round=4,
                         device_mix=("datacenter_h100_sxm", "raspberry_pi_5_8gb"))
    ref = run_experiment(legend, tmp_path / "lg", quiet=True, cache_dir=tmp_path / "cache")
    fast = run_experiment(dataclasses.replace(legend, cut_variants=(1,)), tmp_path / "lg_cut", quiet=True,
                          cache_dir=tmp_path / "cache")
    cuts = {c for r in _rows(tmp_path / "lg") if r["round"] >= 0 for c in r["grad_cut"]}
    assert {0, 1} <= cuts, cuts                 # deep and shallow clients: the variant branch runs
    assert _numbers(tmp_path / "lg") == _numbers(tmp_path / "lg_cut")
    assert fast["compilations_this_call"] == ref["compilations_this_call"] == 1
    assert legend.fingerprint() == dataclasses.replace(legend, cut_variants=(1,)).fingerprint()

    fedsa = tiny_config(tiny_model, "fedsa")
    run_experiment(fedsa, tmp_path / "sa", quiet=True, cache_dir=tmp_path / "cache")
    run_experiment(dataclasses.replace(fedsa, client_state="host"), tmp_path / "sa_host", quiet=True,
                   cache_dir=tmp_path / "cache")
    assert _numbers(tmp_path / "sa") == _numbers(tmp_path / "sa_host")


def test_engine_field_validation(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="cut_variants"):
        tiny_config(tiny_model, "legend", cut_variants=(-1,))
    with pytest.raises(ValueError, match="client_state"):
        tiny_config(tiny_model, "fedsa", client_state="disk")
    with pytest.raises(ValueError, match="not layers of the model"):
        run_experiment(tiny_config(tiny_model, "legend", client_ranks=(), cut_variants=(7,)), tmp_path / "x",
                       quiet=True, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="static_cut"):
        run_experiment(tiny_config(tiny_model, "fedara", client_ranks=(), algo={"static_cut": True},
                                   cut_variants=(1,)), tmp_path / "y", quiet=True, cache_dir=tmp_path / "cache")


def test_population_memory_is_checked_before_allocation():
    from fedlora_jax.federated import MemoryBudgetError, check_population_memory

    check_population_memory(10**9, num_clients=10_000, on_host=False, device_limit_bytes=10**10)
    with pytest.raises(MemoryBudgetError, match="10000 clients.*client_state='host'"):
        check_population_memory(10**9, num_clients=10_000, on_host=False, device_limit_bytes=2 * 10**9)
    with pytest.raises(MemoryBudgetError, match="host RAM.*fewer clients"):
        check_population_memory(10**9, num_clients=10_000, on_host=True, host_limit_bytes=10**9)


def test_head_only_trains_the_head_and_sends_no_factor(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "head_only", client_ranks=())
    run_experiment(cfg, tmp_path / "ho", quiet=True, cache_dir=tmp_path / "cache")
    rows = [r for r in _rows(tmp_path / "ho") if r["round"] >= 0]
    for r in rows:
        assert all(v == [0.0] * 3 for v in r["active_ranks"].values())
        assert r["global_slot_norm"] == [0.0] * cfg.r_max          # the adapters never move from B = 0
    head_bytes = 4 * (32 * 2 + 2)                                     # tiny BERT: hidden 32, 2 labels, float32
    assert rows[0]["client_bytes_up"] == [head_bytes] * 3
    # static_cut (default): no backward pass through the encoder; the same numbers as the full backward
    assert {c for r in rows for c in r["grad_cut"]} == {2}                   # tiny BERT: 2 layers, none active
    full = dataclasses.replace(cfg, algo={"static_cut": False})
    run_experiment(full, tmp_path / "ho_full", quiet=True, cache_dir=tmp_path / "cache")
    rows_full = [r for r in _rows(tmp_path / "ho_full") if r["round"] >= 0]
    for key in ("train_loss", "test_accuracy", "test_loss"):
        np.testing.assert_allclose([r.get(key, np.nan) for r in rows], [r.get(key, np.nan) for r in rows_full],
                                   rtol=2e-5)
    with pytest.raises(TypeError, match="static_cut"):
        run_experiment(dataclasses.replace(cfg, algo={"static_cut": 1}), tmp_path / "ho_bad", quiet=True)
    fedit = run_experiment(dataclasses.replace(tiny_config(tiny_model, "fedit", client_ranks=()), rounds=1),
                           tmp_path / "fi", quiet=True, cache_dir=tmp_path / "cache")
    del fedit
    fi_row = [r for r in _rows(tmp_path / "fi") if r["round"] == 0][0]
    assert fi_row["client_bytes_up"][0] > head_bytes
    assert sum(fi_row["global_slot_norm"]) > 0


def test_slot_norm_and_distributed_accuracy(tiny_model, tmp_path):
    from fedlora_jax.driver import diagnostics as run_lib
    from fedlora_jax.lora import LoraFactors

    a, b = np.arange(6.0).reshape(3, 2), np.arange(8.0).reshape(2, 4)
    lora = {"m": LoraFactors(a, b), "n": LoraFactors(a, b, np.array([2.0, -0.5]))}
    want = [np.linalg.norm(a[:, i]) * np.linalg.norm(b[i]) * (1 + abs([2.0, -0.5][i])) for i in range(2)]
    np.testing.assert_allclose(run_lib.global_slot_norms(lora), want, rtol=1e-5)

    cfg = tiny_config(tiny_model, "hafl", eval_distributed_ranks=(1, 4))
    summary = run_experiment(cfg, tmp_path / "hd", quiet=True, cache_dir=tmp_path / "cache")
    last = _rows(tmp_path / "hd")[-1]
    got = last["distributed_test_accuracy"]
    assert set(got) == {"1", "4"} and summary["distributed_test_accuracy"] == got
    # a rank-4 (r_max) client of HAFL receives the whole global adapter: the global accuracy
    assert got["4"] == pytest.approx(last["test_accuracy"], abs=1e-6)
    with pytest.raises(ValueError, match="no client has rank"):
        run_experiment(tiny_config(tiny_model, "hafl", eval_distributed_ranks=(3,)), tmp_path / "bad", quiet=True)
    with pytest.raises(ValueError, match="eval_distributed_ranks"):
        tiny_config(tiny_model, "hafl", eval_distributed_ranks=(5,))
