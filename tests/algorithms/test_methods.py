"""Each seed method does what its paper describes, through the engine (tiny model, a few rounds).

Every test here failed on the algorithm layer before issue 17 (commit 2439607): HAFL's
selection was locked to the rank prefix, FedARA's ``score_beta`` was dead, the AdaLoRA
baseline equalled FedARA, LEGEND's estimates could not move, and its plans were degenerate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import algo_rounds as ar

from fedlora_jax import aggregation
from fedlora_jax import devices as dev_lib
from fedlora_jax.algorithms import RoundOutputs, build_algorithm, hafl, legend
from fedlora_jax.federated import init_server_state

NAMES = ("fedit", "hetlora", "replication", "flexlora", "flora", "fedex", "ffa", "fedsa", "hafl", "fedara",
         "adalora", "legend")
BUDGET = {"target_rank": 1, "t_init_frac": 0.0, "t_final_frac": 0.25}


def _is_prefix(mask_row) -> bool:
    m = np.asarray(mask_row)
    r = int(m.sum())
    return bool(np.array_equal(m, (np.arange(m.shape[-1]) < r).astype(m.dtype)))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_rounds_on_one_compile(name):
    opts = BUDGET if name in ("fedara", "adalora") else None
    state, metrics, rf = ar.run(name, rounds=3, options=opts)
    assert rf.trace_count() == 1
    assert int(state.round) == 3
    assert all(np.isfinite(m["train_loss"]) for m in metrics)


# ----------------------------------------------------------------------------------- HAFL


def test_hafl_frozen_components_stay_scored():
    """A client's stored scores cover the components it did not update (forward mask 1)."""
    state, hist, _ = ar.run("hafl", rounds=2, return_history=True)
    plan, _ = hist[1]
    ids = np.sort(np.random.default_rng([0, 1]).choice(ar.POPULATION, 3, replace=False))
    for k, upd in plan.update_masks.items():
        scores = np.asarray(state.clients.scores[k])[ids]
        frozen = upd == 0
        assert frozen.any()
        assert np.all(scores[frozen] > 0), (k, scores, upd)


def test_hafl_selection_moves_to_a_component_outside_the_prefix():
    ctx = ar.context(ranks=(1,))
    algo = build_algorithm("hafl", ctx)
    state = init_server_state(ar.init_lora(algo.init_scheme), {}, algo, num_clients=ar.POPULATION)
    ids = np.array([0, 2], np.int32)
    first = algo.plan(state, ids, 0)
    assert all(_is_prefix(row) for m in first.update_masks.values() for row in m)
    scores = {k: v.at[0, 3].set(5.0).at[0, 0].set(1.0) for k, v in state.clients.scores.items()}
    state = state._replace(clients=hafl.HaflClientState(scores, state.clients.seen.at[0].set(True)))
    plan = algo.plan(state, ids, 1)
    for k in plan.update_masks:
        np.testing.assert_array_equal(plan.update_masks[k][0], [0, 0, 0, 1])   # client 0: its best component
        np.testing.assert_array_equal(plan.update_masks[k][1], [1, 0, 0, 0])   # client 2 unseen: the prefix
        np.testing.assert_array_equal(plan.masks[k], np.ones((2, ar.R)))      # full forward


def test_hafl_selection_is_not_locked_to_the_prefix_in_a_run():
    _, hist, _ = ar.run("hafl", rounds=5, return_history=True)
    moved = [not _is_prefix(row) for plan, _ in hist[1:] for m in plan.update_masks.values() for row in m]
    assert any(moved)


def test_hafl_first_round_init_random_is_wired_and_seeded():
    ctx = ar.context(ranks=(2,))
    algo = build_algorithm("hafl", ctx, first_round_init="random")
    state = init_server_state(ar.init_lora(algo.init_scheme), {}, algo, num_clients=ar.POPULATION)
    ids = np.arange(ar.POPULATION, dtype=np.int32)
    a = algo.plan(state, ids, 0).update_masks
    b = algo.plan(state, ids, 0).update_masks
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert np.all(a[k].sum(-1) == 2)
    assert not all(_is_prefix(row) for m in a.values() for row in m)


def test_hafl_importance_sensitivity_vs_uncertainty():
    s1, _, _ = ar.run("hafl", rounds=1)
    s2, _, _ = ar.run("hafl", rounds=1, options={"importance": "sensitivity_uncertainty"})
    assert ar.leaves_differ(s1.clients.scores, s2.clients.scores)
    assert ar.leaves_differ(s1.lora, s2.lora) is False   # scores do not change the first round's training


def test_hafl_truncation_scores_are_renormalised_over_owners():
    rng = np.random.default_rng(0)
    s = rng.random((3, 4)).astype(np.float32)
    m = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    w = np.array([1.0, 2.0, 3.0], np.float32)
    prev = np.array([0.0, 0.0, 0.0, 7.0], np.float32)
    got = hafl.owner_mean_scores({"k": jnp.asarray(s)}, {"k": jnp.asarray(m)}, jnp.asarray(w),
                                 {"k": jnp.asarray(prev)}, beta=0.25)["k"]
    want = []
    for i in range(4):
        own = m[:, i] > 0
        mean = np.sum(w[own] * s[own, i]) / np.sum(w[own])
        want.append(0.25 * prev[i] + 0.75 * mean)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # A slot owned by one client is not pulled toward 0 by the clients that did not hold it.
    assert float(got[3]) == pytest.approx(0.25 * 7.0 + 0.75 * s[1, 3], rel=1e-6)


def test_hafl_truncation_plan_follows_global_scores():
    ctx = ar.context(ranks=(2,), aggregator_options={"score_beta": 0.5})
    algo = build_algorithm("hafl", ctx, mode="truncate")
    state = init_server_state(ar.init_lora(algo.init_scheme), {}, algo, num_clients=ar.POPULATION)
    gs = {k: jnp.array([0.1, 0.0, 0.9, 0.5], jnp.float32) for k in state.algo.global_scores}
    state = state._replace(algo=hafl.HaflState(gs))
    plan = algo.plan(state, np.array([1, 4], np.int32), 3)
    for k in plan.masks:
        np.testing.assert_array_equal(plan.masks[k], [[0, 0, 1, 1]] * 2)
        np.testing.assert_array_equal(plan.update_masks[k], plan.masks[k])


def test_hafl_freeze_refuses_a_score_smoothing_it_would_ignore():
    with pytest.raises(ValueError, match="score_beta"):
        build_algorithm("hafl", ar.context(aggregator_options={"score_beta": 0.5}))


# ------------------------------------------------------------------------- FedARA / AdaLoRA


def _outputs(scores, round_idx, *, r=ar.R):
    keys = tuple(scores)
    ones = {k: jnp.ones((1, r)) for k in keys}
    return RoundOutputs(jnp.int32(round_idx), None, aggregation.ScoreState(scores), {}, jnp.ones(1), ones, ones)


def test_fedara_reads_the_aggregators_smoothed_scores():
    """FedARA allocates from ``agg_state.scores`` (the ``score_beta`` EMA), not a second mean."""
    ctx = ar.context(rounds=8)
    algo = build_algorithm("fedara", ctx, target_rank=2, t_init_frac=0.0, t_final_frac=0.25)
    z0 = algo.init(None)
    favour_last = {k: jnp.array([0.1, 0.2, 0.3, 0.9]) for k in ctx.keys}
    new = algo.server_update(z0, _outputs(favour_last, 7))
    for k in ctx.keys:
        np.testing.assert_array_equal(np.asarray(new.z[k]), [0, 0, 1, 1])


def test_adalora_revives_a_pruned_triplet_fedara_does_not():
    ctx = ar.context(rounds=8)
    kw = dict(target_rank=2, t_init_frac=0.0, t_final_frac=0.25)
    fa, ad = build_algorithm("fedara", ctx, **kw), build_algorithm("adalora", ctx, **kw)
    pruned = {k: jnp.array([1.0, 1.0, 0.0, 0.0]) for k in ctx.keys}
    scores = {k: jnp.array([0.1, 0.2, 0.3, 0.9]) for k in ctx.keys}  # the pruned slot 3 is now the best
    z_fa = fa.server_update(fa.init(None)._replace(z=pruned), _outputs(scores, 3)).z
    z_ad = ad.server_update(ad.init(None)._replace(z=pruned), _outputs(scores, 3)).z
    for k in ctx.keys:
        assert float(z_fa[k][3]) == 0.0 and float(jnp.sum(z_fa[k])) <= 2
        assert float(z_ad[k][3]) == 1.0


def test_adalora_unmasked_forward_lambda_zeroed_in_place_full_traffic():
    ctx = ar.context(rounds=8)
    ad = build_algorithm("adalora", ctx, **BUDGET)
    fa = build_algorithm("fedara", ctx, **BUDGET)
    lora0 = ar.init_lora("svd_form")
    lora0 = {k: f._replace(e=jnp.full_like(f.e, 0.5)) for k, f in lora0.items()}
    state = init_server_state(lora0, {}, ad)
    z = {k: jnp.array([1.0, 0.0, 1.0, 0.0]) for k in ctx.keys}
    state = state._replace(algo=state.algo._replace(z=z))
    ids = np.array([0, 1], np.int32)
    plan = ad.plan(state, ids, 2)
    assert plan.global_masks is None
    for k in ctx.keys:
        np.testing.assert_array_equal(plan.masks[k], np.ones((2, ar.R)))
        np.testing.assert_array_equal(plan.update_masks[k], np.ones((2, ar.R)))
    start = ad.distribute_fn()(state, {k: jnp.ones(ar.R) for k in ctx.keys}, ())
    for k, f in start.items():
        np.testing.assert_array_equal(np.asarray(f.e), [0.5, 0.0, 0.5, 0.0])
        np.testing.assert_array_equal(np.asarray(f.a), np.asarray(lora0[k].a))   # P and Q kept
        np.testing.assert_array_equal(np.asarray(f.b), np.asarray(lora0[k].b))
    up_ad, _ = aggregation.round_bytes(ad.aggregator, lora0, {}, plan.update_masks, plan.masks)
    fa_state = init_server_state(lora0, {}, fa)._replace(algo=state.algo)
    fplan = fa.plan(fa_state, ids, 2)
    up_fa, _ = aggregation.round_bytes(fa.aggregator, lora0, {}, fplan.update_masks, fplan.masks)
    np.testing.assert_allclose(up_fa * 2, up_ad)   # FedARA sends its 2 active triplets of 4


def test_adalora_run_differs_from_fedara():
    s_fa, _, _ = ar.run("fedara", rounds=4, options=BUDGET)
    s_ad, _, _ = ar.run("adalora", rounds=4, options=BUDGET)
    assert ar.leaves_differ(s_fa.lora, s_ad.lora)


# ----------------------------------------------------------------------------------- LEGEND


def _minilm_context(**kw):
    shape = dev_lib.ModelShape(num_layers=6, hidden=384, intermediate=1536, heads=12, vocab=30522, seq_len=32,
                               modules={"query": (384, 384), "value": (384, 384)}, num_labels=2)
    names = ("jetson_agx_orin_64gb", "jetson_orin_nano_8gb", "phone_snapdragon_8_gen_2", "raspberry_pi_5_8gb")
    keys = tuple(sorted(f"layer.{i}.{m}" for i in range(6) for m in ("query", "value")))
    base = ar.context()
    return base._replace(keys=keys, layer_of_key={k: int(k.split(".")[1]) for k in keys}, num_layers=6, r_max=8,
                         client_ranks=np.full(8, 8), client_devices=np.arange(8) % 4,
                         device_profiles=tuple(dev_lib.get_profile(n) for n in names), model_shape=shape,
                         batch_size=8, local_steps=4, **kw)


def test_legend_plan_gives_intermediate_configs_with_ranks_rising_toward_the_output():
    ctx = _minilm_context()
    algo = build_algorithm("legend", ctx, deadline="between")
    state = init_server_state(ar.init_lora("a_random_b_zero"), {}, algo)
    plan = algo.plan(state, np.arange(4, dtype=np.int32), 0)
    layer_ranks = np.stack([[int(plan.masks[f"layer.{i}.query"][c].sum()) for i in range(6)] for c in range(4)])
    inter = [legend.is_intermediate(r, 1, 8) for r in layer_ranks]
    assert sum(inter) >= 2, layer_ranks
    for r in layer_ranks:
        on = r[r > 0]
        assert np.all(np.diff(on) >= 0), r                     # non-decreasing toward the output
        assert np.all(r[: 6 - len(on)] == 0)                   # adapters on the top layers only
    np.testing.assert_array_equal(plan.depth_mask, (layer_ranks > 0).astype(np.float32))


def test_legend_bottom_control_same_payload_on_the_bottom_layers():
    ctx = _minilm_context()
    top = build_algorithm("legend", ctx, deadline="between")
    bottom = build_algorithm("legend", ctx, deadline="between", placement="bottom")
    state = init_server_state(ar.init_lora("a_random_b_zero"), {}, top)
    ids = np.arange(4, dtype=np.int32)
    pt, pb = top.plan(state, ids, 0), bottom.plan(state, ids, 0)
    for i in range(6):
        for m in ("query", "value"):
            np.testing.assert_array_equal(pb.masks[f"layer.{i}.{m}"], pt.masks[f"layer.{5 - i}.{m}"])
    assert any(not np.array_equal(pb.masks[k], pt.masks[k]) for k in pt.masks)


def test_legend_estimates_follow_measured_times_not_the_estimate():
    nominal, _, _ = ar.run("legend", rounds=3)
    slow = np.ones(ar.POPULATION)
    slow[1::2] = 0.25                                           # the Raspberry Pis run at a quarter speed
    drifted, _, _ = ar.run("legend", rounds=3, speed=slow)
    f0 = np.asarray(nominal.algo.flops_per_s)
    f1 = np.asarray(drifted.algo.flops_per_s)
    init = legend.estimate_from_profile(dev_lib.get_profile("raspberry_pi_5_8gb")).flops_per_s
    np.testing.assert_allclose(f0[1], init, rtol=1e-5)         # measured == estimated: no change
    assert f1[1] < 0.8 * init                                  # a slower device is seen as slower
    np.testing.assert_allclose(f1[0], f0[0], rtol=1e-5)        # the other device type is untouched


def test_legend_needs_devices_and_shape():
    with pytest.raises(ValueError, match="device profiles"):
        build_algorithm("legend", ar.context()._replace(device_profiles=()))
    with pytest.raises(ValueError, match="placement"):
        build_algorithm("legend", ar.context(), placement="middle")


# ------------------------------------------------------------------------------ validation


def test_unknown_option_refused_with_allowed_list():
    with pytest.raises(ValueError, match=r"algorithm 'fedara': unknown option\(s\) \['target_rnak'\] "
                                         r"\(did you mean 'target_rank'\?\)"):
        build_algorithm("fedara", ar.context(), target_rnak=2)
    with pytest.raises(ValueError, match="allowed: none"):
        build_algorithm("fedit", ar.context(), mode="x")


def test_aliases_and_suggestions():
    assert build_algorithm("fedavg", ar.context()).name == "fedit"
    with pytest.raises(ValueError, match="did you mean 'fedara'"):
        build_algorithm("fedarra", ar.context())


def test_round_refuses_bad_masks_and_ids_before_tracing():
    state, _, rf = ar.run("fedsa", rounds=1)
    _, hist, _ = ar.run("fedsa", rounds=1, return_history=True)
    from fedlora_jax.federated import make_spec

    ids = np.array([0, 1, 99], np.int32)
    masks = {k: np.ones((3, ar.R), np.float32) for k in state.lora}
    spec = make_spec(masks, num_steps=[1, 1, 1], weight=[1, 1, 1], client_id=ids, num_layers=3)
    from helpers import tiny

    data = tiny.batches(jax.random.key(0), 3, 3, 4)
    base = tiny.init_base(jax.random.key(1))
    with pytest.raises(ValueError, match="outside the population of 6 clients"):
        rf(state, data, spec, jax.random.key(0), base)
    bad = spec._replace(client_id=np.array([0, 1, 2], np.int32),
                        masks={k: np.ones((3, ar.R + 1), np.float32) for k in state.lora})
    with pytest.raises(ValueError, match=r"expected \[C, R\]"):
        rf(state, data, bad, jax.random.key(0), base)
    assert rf.trace_count() == 1


def test_docs_worked_example_a_new_method_is_one_file(monkeypatch):
    """The example of docs/architecture.md, executed: registered with one line, it runs."""
    import re
    from pathlib import Path

    from fedlora_jax.algorithms import registry

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(# fedlora_jax/algorithms/top_heavy\.py.*?)```", doc, re.S).group(1)
    module = {}
    exec(compile(code, "top_heavy.py", "exec"), module)
    monkeypatch.setitem(registry.BUILDERS, "top_heavy", module["build"])
    state, metrics, rf = ar.run("top_heavy", rounds=2, options={"keep": 0.5})
    assert rf.trace_count() == 1 and int(state.round) == 2
    with pytest.raises(ValueError, match="option keep"):
        ar.run("top_heavy", rounds=1, options={"keep": 2.0})
