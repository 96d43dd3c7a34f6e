"""Importance scores vs a NumPy port of PEFT ``RankAllocator.update_ipt`` / ``mask_to_budget``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import importance as imp
from fedlora_jax.lora import LoraFactors

N, M, R = 5, 7, 4


class PeftRankAllocatorPort:
    """NumPy port of PEFT RankAllocator (PEFT orientation: A [r, in], B [out, r], E [r, 1])."""

    def __init__(self, beta1, beta2):
        self.beta1, self.beta2 = beta1, beta2
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def update_ipt(self, named):  # named: {name: (p, grad)}
        for n, (p, g) in named.items():
            if n not in self.ipt:
                self.ipt[n] = np.zeros_like(p)
                self.exp_avg_ipt[n] = np.zeros_like(p)
                self.exp_avg_unc[n] = np.zeros_like(p)
            self.ipt[n] = np.abs(p * g)
            self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
            self.exp_avg_unc[n] = (self.beta2 * self.exp_avg_unc[n]
                                   + (1 - self.beta2) * np.abs(self.ipt[n] - self.exp_avg_ipt[n]))

    def element_score(self, n):
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def triplet_scores(self, modules):
        out = {}
        for m in modules:
            a = self.element_score(f"{m}.lora_A").mean(axis=1)  # [r]
            b = self.element_score(f"{m}.lora_B").mean(axis=0)  # [r]
            e = self.element_score(f"{m}.lora_E").reshape(-1)
            out[m] = e + np.stack([a, b], axis=1).sum(axis=1)
        return out

    def mask_to_budget(self, scores, init_bgt, budget):
        allv = np.concatenate([scores[m] for m in sorted(scores)])
        thr = np.sort(allv)[init_bgt - budget - 1]  # torch.kthvalue(k) is the k-th smallest
        return {m: (scores[m] > thr).astype(np.float32) for m in scores}


def _rand_tree(rng, mods, with_e=True):
    return {m: LoraFactors(rng.normal(size=(N, R)).astype(np.float32),
                           rng.normal(size=(R, M)).astype(np.float32),
                           rng.normal(size=(R,)).astype(np.float32) if with_e else None)
            for m in mods}


def test_ema_and_triplets_match_peft_port():
    rng = np.random.default_rng(0)
    mods = ["layer.0.query", "layer.0.value", "layer.1.query"]
    port = PeftRankAllocatorPort(0.85, 0.85)
    state = imp.ema_init(_rand_tree(rng, mods))
    for _ in range(4):
        p, g = _rand_tree(rng, mods), _rand_tree(rng, mods)
        port.update_ipt({f"{m}.{nm}": (np.asarray(x).T if nm != "lora_E" else np.asarray(x)[:, None],
                                       np.asarray(y).T if nm != "lora_E" else np.asarray(y)[:, None])
                         for m in mods
                         for nm, x, y in (("lora_A", p[m].a, g[m].a), ("lora_B", p[m].b, g[m].b),
                                          ("lora_E", p[m].e, g[m].e))})
        state = jax.jit(imp.ema_update)(state, imp.sensitivity(p, g))
    for m in mods:
        np.testing.assert_allclose(state.ibar[m].a, port.exp_avg_ipt[f"{m}.lora_A"].T, rtol=1e-5)
        np.testing.assert_allclose(state.ubar[m].b, port.exp_avg_unc[f"{m}.lora_B"].T, rtol=1e-5,
                                   atol=1e-7)
    ours = imp.triplet_scores(imp.element_scores(state))
    ref = port.triplet_scores(mods)
    for m in mods:
        assert ours[m].shape == (R,)
        np.testing.assert_allclose(ours[m], ref[m], rtol=1e-5, atol=1e-8)
    # PEFT mask_to_budget (distinct scores: no ties) == our global top-k.
    init_bgt = len(mods) * R
    for budget in (1, 5, 9, init_bgt - 1):
        want = port.mask_to_budget(ref, init_bgt, budget)
        got = imp.topk_masks({m: jnp.asarray(ref[m]) for m in mods}, budget, nested=False)
        for m in mods:
            np.testing.assert_array_equal(got[m], want[m])
        assert sum(float(got[m].sum()) for m in mods) == budget


def test_scalar_recursion_by_hand():
    # T2.1: Ubar uses the UPDATED Ibar.
    ws, gs = [1.0, -2.0, 0.5], [0.5, 1.0, 4.0]
    ib = ub = 0.0
    state = imp.ema_init(jnp.zeros(()))
    for w, g in zip(ws, gs, strict=True):
        i = abs(w * g)
        ib = 0.85 * ib + 0.15 * i
        ub = 0.85 * ub + 0.15 * abs(i - ib)
        state = imp.ema_update(state, imp.sensitivity(jnp.float32(w), jnp.float32(g)))
    np.testing.assert_allclose(state.ibar, ib, rtol=1e-6)
    np.testing.assert_allclose(state.ubar, ub, rtol=1e-6)
    np.testing.assert_allclose(imp.element_scores(state), ib * ub, rtol=1e-6)


def test_uncertainty_off_keeps_ubar_and_scores_ibar():
    state = imp.ema_update(imp.ema_init(jnp.zeros(3)), jnp.ones(3), beta1=0.5, uncertainty=False)
    np.testing.assert_allclose(state.ibar, 0.5)
    np.testing.assert_allclose(state.ubar, 0.0)
    np.testing.assert_allclose(imp.element_scores(state, uncertainty=False), 0.5)


def test_triplet_without_e_is_mean_not_sum():
    # T2.2: s = ones -> 2; s(a[:, i]) = c_i, s(b) = 0 -> c (independent of N).
    ones = LoraFactors(jnp.ones((N, R)), jnp.ones((R, M)), None)
    np.testing.assert_allclose(imp.triplet_score(ones), 2.0)
    c = jnp.arange(R, dtype=jnp.float32)
    t = imp.triplet_score(LoraFactors(jnp.tile(c, (N, 1)), jnp.zeros((R, M)), None))
    np.testing.assert_allclose(t, c)
    with_e = LoraFactors(jnp.ones((N, R)), jnp.ones((R, M)), jnp.full((R,), 3.0))
    np.testing.assert_allclose(imp.triplet_score(with_e), 5.0)


def test_stacked_clients_and_bf16_storage():
    rng = np.random.default_rng(1)
    p = {"m": LoraFactors(*(jnp.asarray(rng.normal(size=s), jnp.bfloat16)
                            for s in ((3, N, R), (3, R, M), (3, R))))}
    g = jax.tree.map(lambda x: x * 2, p)
    s = imp.sensitivity(p, g)
    assert s["m"].a.dtype == jnp.float32
    t = imp.triplet_scores(s)["m"]
    assert t.shape == (3, R)
    for c in range(3):
        ref = imp.triplet_score(jax.tree.map(lambda x, c=c: x[c], s["m"]))
        np.testing.assert_allclose(t[c], ref, rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="beta1"):
        imp.ema_update(imp.ema_init(jnp.zeros(2)), jnp.ones(2), beta1=1.5)
    with pytest.raises(ValueError, match="tree structure"):
        imp.sensitivity({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(TypeError, match="LoraFactors"):
        imp.triplet_scores({"m": jnp.ones(3)})


def test_public_names():
    import fedlora_jax.devices as dv

    for mod in (imp, dv):
        for name in mod.__all__:
            assert hasattr(mod, name), name
    assert {"sensitivity", "ema_update", "topk_masks", "budget_schedule"} <= set(imp.__all__)
