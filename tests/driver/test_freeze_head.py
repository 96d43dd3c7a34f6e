"""``freeze_head``: the classifier head stays at its initialization and never travels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.tiny_bert import write_tiny_bert, write_tiny_sentiment

from fedlora_jax.driver import checkpoint
from fedlora_jax.driver.config import ExperimentConfig, make_optimizer
from fedlora_jax.driver.run import run_experiment
from fedlora_jax.driver.setup import build_setup, init_state


def test_optimizer_sets_the_head_updates_to_zero():
    tree = {"lora": {"a": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), tree)
    for frozen in (False, True):
        opt = make_optimizer(ExperimentConfig(lr=0.1, weight_decay=0.1, freeze_head=frozen))
        state = opt.init(tree)
        new = tree
        for _ in range(3):
            updates, state = opt.update(grads, state, new)
            new = optax.apply_updates(new, updates)
        assert not np.allclose(new["lora"]["a"], tree["lora"]["a"])
        moved = any(not np.array_equal(n, o) for n, o in zip(jax.tree.leaves(new["head"]), jax.tree.leaves(tree["head"]), strict=True))
        assert moved is not frozen  # weight decay and momentum included: a frozen head does not move at all


def test_config_rules():
    with pytest.raises(ValueError, match="'freeze_head' = 1 is invalid"):
        ExperimentConfig(freeze_head=1)
    with pytest.raises(ValueError, match="no trainable head"):
        ExperimentConfig(task="cls_generation", freeze_head=True)
    assert ExperimentConfig(freeze_head=False).fingerprint() == ExperimentConfig().fingerprint()
    assert ExperimentConfig(freeze_head=True).fingerprint() != ExperimentConfig().fingerprint()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze")
    model = write_tiny_bert(root / "bert")
    data = write_tiny_sentiment(root / "data")
    return ExperimentConfig(model=str(model), dataset=str(data), max_length=16, num_clients=4, clients_per_round=2,
                            rounds=2, local_steps=2, batch_size=4, partition="iid", r_max=4, eval_batch_size=8,
                            lr=1e-2, weight_decay=0.01), root


def test_run_keeps_the_head_and_sends_the_adapter_alone(tiny_run):
    base, root = tiny_run
    frozen_cfg = dataclasses.replace(base, freeze_head=True)
    frozen = run_experiment(frozen_cfg, root / "frozen", quiet=True, cache_dir=root / "cache")
    trained = run_experiment(base, root / "trained", quiet=True, cache_dir=root / "cache")
    setup = build_setup(frozen_cfg, quiet=True, cache_dir=root / "cache")
    template = init_state(setup)
    _, state, _ = checkpoint.restore(root / "frozen" / "checkpoints", template, fingerprint=frozen_cfg.fingerprint())
    # the head is the seed's initialization (up to the rounding of a weighted mean of equal heads)
    for got, want in zip(jax.tree.leaves(state.head), jax.tree.leaves(template.head), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    assert any(float(jnp.abs(f.b).max()) > 0 for f in state.lora.values())  # the adapters trained
    head_bytes = 4 * sum(int(np.size(x)) for x in jax.tree.leaves(template.head))
    per_round = base.clients_per_round * head_bytes
    assert trained["total_bytes_up"] - frozen["total_bytes_up"] == base.rounds * per_round
    assert trained["total_bytes_down"] - frozen["total_bytes_down"] == base.rounds * per_round


def test_head_only_with_a_frozen_head_is_refused(tiny_run):
    base, root = tiny_run
    cfg = dataclasses.replace(base, algorithm="head_only", freeze_head=True)
    with pytest.raises(ValueError, match="trains no adapter slot in round 0"):
        run_experiment(cfg, root / "refused", quiet=True, cache_dir=root / "cache")
