import dataclasses

import pytest

from fedlora_jax.driver.config import ExperimentConfig, apply_overrides, from_dict, load_config


def test_defaults_valid_and_scale():
    cfg = ExperimentConfig()
    assert cfg.scale == cfg.lora_alpha / cfg.r_max


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'local_steps'"):
        apply_overrides(ExperimentConfig(), ["local_step=3"])
    with pytest.raises(ValueError, match="did you mean 'dirichlet_alpha'"):
        from_dict({"dirichlet_alfa": 0.3})


def test_overrides_are_typed_and_never_evaluated():
    cfg = apply_overrides(ExperimentConfig(algorithm="fedara"),
                          ["rounds=3", "lr=1e-3", "target_modules=['query','key']", "client_ranks=[2,4]",
                           "algo.target_rank=2", "name=abc"])
    assert cfg.rounds == 3 and cfg.lr == 1e-3 and cfg.target_modules == ("query", "key")
    assert cfg.client_ranks == (2, 4) and cfg.algo == {"target_rank": 2} and cfg.name == "abc"
    # An option the algorithm does not have is refused when the config is built.
    with pytest.raises(ValueError, match=r"algorithm 'fedit': unknown option\(s\) \['target_rank'\]"):
        apply_overrides(ExperimentConfig(), ["algo.target_rank=2"])
    # A Python expression is not evaluated: it stays a string and fails the type check.
    with pytest.raises(ValueError, match="rounds"):
        apply_overrides(ExperimentConfig(), ["rounds=__import__('os').getpid()"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(ExperimentConfig(), ["rounds"])


@pytest.mark.parametrize("field,value,msg", [
    ("dirichlet_alpha", 0.0, "dirichlet_alpha"),
    ("dirichlet_alpha", -1.0, "dirichlet_alpha"),
    ("clients_per_round", 50, "clients_per_round"),
    ("algorithm", "fedavgg", "did you mean"),
    ("client_ranks", (0,), "client_ranks"),
    ("client_ranks", (9,), "client_ranks"),
    ("r_max", 0, "r_max"),
    ("dropout_prob", 1.0, "dropout_prob"),
    ("dtype", "float16", "dtype"),
    ("partition", "dirichlett", "did you mean 'dirichlet'"),
])
def test_bad_values_name_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(ExperimentConfig(), **{field: value})


def test_fingerprint_ignores_bookkeeping_only():
    a = ExperimentConfig()
    assert a.fingerprint() == dataclasses.replace(a, name="x", rounds=99, eval_every=3).fingerprint()
    assert a.fingerprint() != dataclasses.replace(a, lr=1e-2).fingerprint()


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    p = tmp_path / "c.py"
    p.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(p)


def test_truncate_metrics_drops_torn_last_line_and_later_rounds(tmp_path):
    from fedlora_jax.driver.metrics_io import truncate_metrics as _truncate_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": -1}\n{"round": 0}\n{"round": 1}\n{"round": 2, "test_acc')
    _truncate_metrics(p, 1)
    assert p.read_text() == '{"round": -1}\n{"round": 0}\n'
    p.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        _truncate_metrics(p, 1)


def test_client_accuracies_weight_per_class_accuracy_by_label_histogram():
    import numpy as np

    from fedlora_jax.driver.tasks import client_accuracies

    per_class = np.array([0.9, 0.5, np.nan])  # class 2 absent from the test set
    hist = np.array([[10, 0, 5], [1, 3, 0], [0, 0, 7]])
    got = client_accuracies(per_class, hist)
    ref = [0.9, (0.9 * 1 + 0.5 * 3) / 4, 0.0]
    np.testing.assert_allclose(got, ref)


def test_select_variant():
    from fedlora_jax.driver.config import SMOKE_OVERRIDES, select_variant

    cfg = ExperimentConfig(name="x")
    assert select_variant(cfg, "full") is cfg
    s = select_variant(cfg, "smoke", target_modules=("query",))
    assert s.name == "x-smoke" and s.rounds == SMOKE_OVERRIDES["rounds"] and s.target_modules == ("query",)
    with pytest.raises(ValueError, match="variant"):
        select_variant(cfg, "medium")


def test_algorithm_aliases_and_fitting_suggestions():
    assert ExperimentConfig(algorithm="fedavg").algorithm == "fedavg"          # an alias of fedit
    with pytest.raises(ValueError, match="did you mean 'fedavg'"):              # not 'fedsa'
        ExperimentConfig(algorithm="fedavgg")
    from fedlora_jax.algorithms import build_algorithm, canonical_name

    assert canonical_name("FedAvg") == "fedit" and canonical_name("zero-padding") == "hetlora"
    with pytest.raises(ValueError, match="did you mean 'fedavg'"):
        build_algorithm("fedavgg", None)
