"""Cubic budget schedule (PEFT formula) and top-k masks (ties, nesting, traced budgets)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import importance as imp


def peft_budget_schedule(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    """Verbatim port of PEFT RankAllocator.budget_schedule."""
    if step <= tinit:
        budget, mask_ind = init_bgt, False
    elif step > total_step - tfinal:
        budget, mask_ind = target_bgt, True
    else:
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
        mask_ind = True if step % deltaT == 0 else False
    return budget, mask_ind


CFGS = [dict(b0=144, b_final=48, t_init=10, t_final=20, total=100, mask_interval=1),
        dict(b0=96, b_final=32, t_init=0, t_final=0, total=37, mask_interval=3),
        dict(b0=12, b_final=12, t_init=2, t_final=2, total=9, mask_interval=2)]


@pytest.mark.parametrize("cfg", CFGS)
def test_schedule_matches_peft_and_phases(cfg):
    sched = imp.BudgetSchedule(**cfg)
    ts = np.arange(0, cfg["total"] + 3)
    ref = [peft_budget_schedule(int(t), cfg["b0"], cfg["b_final"], cfg["t_init"], cfg["t_final"],
                                cfg["total"], cfg["mask_interval"]) for t in ts]
    py = [sched(int(t)) for t in ts]
    assert py == ref
    assert all(isinstance(b, int) and isinstance(a, bool) for b, a in py)
    bud, alloc = jax.jit(jax.vmap(sched))(jnp.asarray(ts, jnp.int32))
    np.testing.assert_array_equal(bud, [b for b, _ in ref])
    np.testing.assert_array_equal(alloc, [a for _, a in ref])
    budgets = [b for b, _ in ref]
    assert all(x >= y for x, y in zip(budgets, budgets[1:], strict=False))  # non-increasing
    warm = ts <= cfg["t_init"]
    final = ts > cfg["total"] - cfg["t_final"]
    assert all(b == cfg["b0"] and not a for (b, a), w in zip(ref, warm, strict=True) if w)
    assert all(b == cfg["b_final"] and a for (b, a), f in zip(ref, final, strict=True) if f)


def test_schedule_errors():
    with pytest.raises(ValueError, match="b_final"):
        imp.budget_schedule(0, b0=4, b_final=8, t_init=0, t_final=0, total=3)
    with pytest.raises(ValueError, match="total - t_final - t_init"):
        imp.budget_schedule(0, b0=8, b_final=4, t_init=5, t_final=5, total=10)
    with pytest.raises(TypeError, match="integer"):
        imp.budget_schedule(jnp.float32(1), b0=8, b_final=4, t_init=0, t_final=0, total=10)


def _ref_topk(flat, budget, prev=None):
    """Python-loop reference: rank by (-score, index), skip inactive, keep first `budget`."""
    idx = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    if prev is not None:
        idx = [i for i in idx if prev[i]]
    keep = np.zeros(len(flat), np.float32)
    keep[idx[:budget]] = 1
    return keep


def test_global_topk_ties_lower_flat_index_wins():
    scores = {"b": jnp.array([2.0, 2.0, 1.0]), "a": jnp.array([2.0, 0.0, 2.0])}
    got = imp.topk_masks(scores, 3)
    # flat order: a0 a1 a2 b0 b1 b2 = 2 0 2 2 2 1 -> keep a0 a2 b0
    np.testing.assert_array_equal(got["a"], [1, 0, 1])
    np.testing.assert_array_equal(got["b"], [1, 0, 0])


def test_topk_random_vs_reference_nested_and_traced():
    rng = np.random.default_rng(0)
    f = jax.jit(lambda s, b, p: imp.topk_masks(s, b, prev_masks=p, nested=True))
    for _ in range(20):
        sizes = {"m0": 4, "m1": 4, "m2": 4}
        s = {k: jnp.asarray(rng.integers(0, 3, size=n).astype(np.float32)) for k, n in sizes.items()}
        prev = {k: jnp.asarray(rng.integers(0, 2, size=n).astype(np.float32)) for k, n in sizes.items()}
        budget = int(rng.integers(0, 13))
        got = f(s, jnp.int32(budget), prev)  # traced budget: one compile for all trials
        flat = np.concatenate([np.asarray(s[k]) for k in sorted(s)])
        pv = np.concatenate([np.asarray(prev[k]) for k in sorted(s)])
        want = _ref_topk(list(flat), budget, list(pv.astype(bool)))
        np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(s)]), want)
        assert np.all(np.concatenate([got[k] for k in sorted(s)]) <= pv)  # never revives
    assert f._cache_size() == 1


def test_nested_across_rounds_and_reviving_variant():
    rng = np.random.default_rng(1)
    masks = {"x": jnp.ones(6), "y": jnp.ones(6)}
    for budget in (10, 8, 5, 3, 3, 1):
        s = {k: jnp.asarray(rng.normal(size=6)) for k in masks}
        new = imp.topk_masks(s, budget, prev_masks=masks)
        assert all(np.all(np.asarray(new[k]) <= np.asarray(masks[k])) for k in masks)
        assert sum(float(new[k].sum()) for k in new) == budget
        masks = new
    # Reviving: ignores prev, may turn a pruned slot back on.
    s = {"x": jnp.array([0.0, 0, 0, 0, 0, 9]), "y": jnp.zeros(6)}
    prev = {"x": jnp.array([1.0, 1, 1, 1, 1, 0]), "y": jnp.ones(6)}
    assert float(imp.topk_masks(s, 1, prev_masks=prev, nested=False)["x"][5]) == 1.0
    assert float(imp.topk_masks(s, 1, prev_masks=prev, nested=True)["x"][5]) == 0.0


def test_topk_per_leading_axis_budget_and_nan():
    s = {"m": jnp.array([[3.0, 1.0, 2.0], [jnp.nan, 1.0, 0.5]])}
    got = imp.topk_masks(s, jnp.array([1, 2]))["m"]
    np.testing.assert_array_equal(got, [[1, 0, 0], [0, 1, 1]])


def test_per_client_topk():
    rng = np.random.default_rng(2)
    s = jnp.asarray(rng.integers(0, 3, size=(5, 6)).astype(np.float32))
    k = jnp.array([0, 1, 3, 6, 9])
    got = jax.jit(imp.per_client_topk)(s, k)
    for c in range(5):
        want = _ref_topk(list(np.asarray(s[c])), int(min(k[c], 6)))
        np.testing.assert_array_equal(got[c], want)
    tree = imp.per_client_topk({"a": s, "b": s[:, ::-1]}, 2)
    assert set(tree) == {"a", "b"} and np.all(np.asarray(tree["a"].sum(-1)) == 2)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        imp.per_client_topk(s, -1)
    with pytest.raises(TypeError, match="integer"):
        imp.topk_masks({"a": s}, 1.5)
