"""Known-answer tests per method against NumPy references written from the spec's equations.

References use the paper orientation ``A [r, d_in] = a^T``, ``B [d_out, r] = b^T`` and the
spec's notation (shared/papers/aggregation.md); test ids T*.* refer to that file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aggregation._agg_cases import SCALE, make_case, to_np

from fedlora_jax import aggregation as ag
from fedlora_jax import lora
from fedlora_jax.lora import LoraFactors

KEY = "layer.0.query"


# ---------------------------------------------------------------- NumPy references (spec orientation)


def spec(f):
    """(A [C, R, N], B [C, M, R]) from our a [C, N, R], b [C, R, M]."""
    return np.swapaxes(np.asarray(f.a, np.float64), -1, -2), np.swapaxes(np.asarray(f.b, np.float64), -1, -2)


def ref_rowmean(X, M, w, prev, *, renorm, rows=True):
    """Primitive (R): X [K, r, d] (rows) or [K, d, r] (cols); M [K, r]; w [K, r] (zero where masked)."""
    K, r = M.shape
    out = np.array(prev, np.float64)
    for i in range(r):
        den = sum(w[k, i] for k in range(K))
        if den == 0:
            continue
        num = sum(w[k, i] * (X[k][i] if rows else X[k][:, i]) for k in range(K))
        val = num / den if renorm else num
        if rows:
            out[i] = val
        else:
            out[:, i] = val
    return out


def one_module(seed=0, ranks=(2, 4, 3, 4), with_e=False, key=KEY):
    glob, clients, w, masks, extras = make_case(seed, ranks=ranks, with_e=with_e)
    p = np.asarray(w, np.float64) / np.sum(np.asarray(w, np.float64))
    return glob, clients, w, masks, extras, p, np.asarray(masks[key], np.float64)


def run(agg, glob, clients, w, masks, extras=None):
    return agg.aggregate(glob, clients, w, masks, agg.init(glob), extras=extras)


def single(tree, key=KEY):
    return {key: tree[key]}


# ---------------------------------------------------------------- FedIT / zero padding (3.1)


def test_T3_1a_fedit_equals_weighted_sum_with_zero_padding():
    glob, clients, w, masks, _, p, M = one_module()
    new, _ = run(ag.fedit(), single(glob), single(clients), w, single(masks))
    A, B = spec(clients[KEY])
    Ag, Bg = spec(glob[KEY])
    wk = p[:, None] * M
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, ref_rowmean(A, M, wk, Ag, renorm=False), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new[KEY].b).T,
                               ref_rowmean(B, M, wk, Bg, renorm=False, rows=False), atol=1e-5)


def test_T3_1b_fedit_product_error_is_covariance_identity_X():
    glob, clients, w, masks, _, p, _ = one_module(ranks=(4, 4, 4, 4))
    new, _ = run(ag.fedit(), single(glob), single(clients), w, single(masks))
    A, B = spec(clients[KEY])
    Abar, Bbar = np.einsum("k,krd->rd", p, A), np.einsum("k,kor->or", p, B)
    lhs = np.einsum("k,kor,krd->od", p, B, A) - Bbar @ Abar
    rhs = sum(p[k] * (B[k] - Bbar) @ (A[k] - Abar) for k in range(len(p)))
    np.testing.assert_allclose(lhs, rhs, atol=1e-10)
    got = np.einsum("k,kor,krd->od", p, B, A) - (np.asarray(new[KEY].a) @ np.asarray(new[KEY].b)).T
    np.testing.assert_allclose(got, rhs, atol=1e-4)


def test_T3_1c_fedit_exact_when_all_A_identical():
    glob, clients, w, masks, _, p, _ = one_module(ranks=(4, 4, 4, 4))
    f = clients[KEY]
    f = LoraFactors(jnp.broadcast_to(f.a[:1], f.a.shape), f.b)
    new, _ = run(ag.fedit(), single(glob), {KEY: f}, w, single(masks))
    A, B = spec(f)
    want = np.einsum("k,kor,krd->od", p, B, A)
    np.testing.assert_allclose((np.asarray(new[KEY].a) @ np.asarray(new[KEY].b)).T, want, atol=1e-4)


# ---------------------------------------------------------------- replication padding (sec. 1)


def _two_client_rank_2_4():
    """Hand example: K=2, r=(2,4), d_in=2 (A rows), one output feature."""
    A0 = np.array([[1.0, 2.0], [3.0, 4.0], [0, 0], [0, 0]])
    A1 = np.array([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0]])
    B0 = np.array([[1.0, -1.0, 0, 0]])
    B1 = np.array([[3.0, 1.0, 2.0, 4.0]])
    a = jnp.asarray(np.stack([A0.T, A1.T]), jnp.float32)          # [2, N=2, R=4]
    b = jnp.asarray(np.stack([B0.T, B1.T]), jnp.float32)          # [2, R=4, M=1]
    masks = {"m": jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)}
    glob = {"m": LoraFactors(jnp.zeros((2, 4)), jnp.zeros((4, 1)))}
    return glob, {"m": LoraFactors(a, b)}, masks


@pytest.mark.parametrize("w, rows01", [((1.0, 1.0), [[3, 4], [5, 6]]), ((1.0, 3.0), [[4, 5], [6, 7]])])
def test_T1_2_replication_hand_example(w, rows01):
    glob, clients, masks = _two_client_rank_2_4()
    w = jnp.asarray(w)
    rep, _ = run(ag.replication_padding(), glob, clients, w, masks)
    want_A = np.array(rows01 + [[9, 10], [11, 12]], np.float64)       # rows 2,3 = rank-4 client's
    np.testing.assert_allclose(np.asarray(rep["m"].a).T, want_A, atol=1e-6)
    p1 = float(w[1] / w.sum())
    zp, _ = run(ag.fedit(), glob, clients, w, masks)
    np.testing.assert_allclose(np.asarray(zp["m"].a).T[2:], p1 * want_A[2:], atol=1e-6)   # dilution
    # B columns: col 0 = p0*1 + p1*3, cols 2,3 = client 1's
    p0 = 1 - p1
    np.testing.assert_allclose(np.asarray(rep["m"].b)[:, 0], [p0 * 1 + p1 * 3, p0 * -1 + p1 * 1, 2, 4], atol=1e-6)
    # REP-COPY with a single owner of rows 2,3 is the same
    cp, _ = run(ag.replication_padding(variant="copy"), glob, clients, w, masks)
    np.testing.assert_allclose(np.asarray(cp["m"].a), np.asarray(rep["m"].a), atol=1e-6)


def test_T1_1_replication_reduces_to_fedavg_with_full_ranks():
    glob, clients, w, masks, _, p, _ = one_module(ranks=(4, 4, 4, 4))
    rep, _ = run(ag.replication_padding(), single(glob), single(clients), w, single(masks))
    A, B = spec(clients[KEY])
    np.testing.assert_allclose(np.asarray(rep[KEY].a).T, np.einsum("k,krd->rd", p, A), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rep[KEY].b).T, np.einsum("k,kor->or", p, B), atol=1e-5)


def test_T1_3_replication_is_fedavg_of_explicitly_replicated_stacks():
    glob, clients, w, masks, _, p, M = one_module()
    A, B = spec(clients[KEY])
    K, r = M.shape
    xbarA = [sum(p[k] * M[k, i] * A[k, i] for k in range(K)) / sum(p[k] * M[k, i] for k in range(K))
             for i in range(r)]
    xbarB = [sum(p[k] * M[k, i] * B[k][:, i] for k in range(K)) / sum(p[k] * M[k, i] for k in range(K))
             for i in range(r)]
    A_rep, B_rep = A.copy(), B.copy()
    for k in range(K):
        for i in range(r):
            if M[k, i] == 0:
                A_rep[k, i], B_rep[k][:, i] = xbarA[i], xbarB[i]
    rep, _ = run(ag.replication_padding(), single(glob), single(clients), w, single(masks))
    np.testing.assert_allclose(np.asarray(rep[KEY].a).T, np.einsum("k,krd->rd", p, A_rep), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rep[KEY].b).T, np.einsum("k,kor->or", p, B_rep), atol=1e-5)


def test_replication_copy_reference():
    """REP-COPY: missing row i = the donor's row (highest rank, then largest weight)."""
    glob, clients, w, masks, _, p, M = one_module(ranks=(2, 4, 3, 1))
    A, _ = spec(clients[KEY])
    K, r = M.shape
    ranks = M.sum(1)
    want = np.zeros((r, A.shape[2]))
    for i in range(r):
        owners = [k for k in range(K) if M[k, i]]
        donor = max(owners, key=lambda k: (ranks[k], p[k]))
        want[i] = sum(p[k] * (A[k, i] if M[k, i] else A[donor, i]) for k in range(K))
    got, _ = run(ag.replication_padding(variant="copy"), single(glob), single(clients), w, single(masks))
    np.testing.assert_allclose(np.asarray(got[KEY].a).T, want, atol=1e-5)


def test_T1_4_distribution_truncates_to_client_rank():
    glob, clients, w, masks, _, _, _ = one_module()
    agg = ag.replication_padding()
    new, st = run(agg, single(glob), single(clients), w, single(masks))
    m = jnp.asarray([1, 1, 0, 0], jnp.float32)
    out = agg.distribute(new, {KEY: m}, st)[KEY]
    np.testing.assert_array_equal(np.asarray(out.a)[:, 2:], 0)
    np.testing.assert_array_equal(np.asarray(out.b)[2:], 0)
    np.testing.assert_array_equal(np.asarray(out.a)[:, :2], np.asarray(new[KEY].a)[:, :2])


# ---------------------------------------------------------------- HAFL (sec. 2.5)


def test_T2_3_hafl_reduces_to_fedavg():
    glob, clients, w, masks, _, p, _ = one_module(ranks=(4, 4, 4, 4))
    new, _ = run(ag.rank1_adaptive(), single(glob), single(clients), w, single(masks))
    A, B = spec(clients[KEY])
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, np.einsum("k,krd->rd", p, A), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new[KEY].b).T, np.einsum("k,kor->or", p, B), atol=1e-5)


def test_T2_4_hafl_only_updaters_count_and_untouched_kept_bit_exact():
    glob, clients, w, masks, _, _, _ = one_module()
    u = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]], jnp.float32)
    u = u.at[0, 2].set(1)            # only client 0 updates component 2; nobody updates... none
    u = u.at[:, 3].set(0)            # nobody updates component 3
    new, _ = run(ag.rank1_adaptive(), single(glob), single(clients), w, {KEY: u})
    np.testing.assert_allclose(np.asarray(new[KEY].a)[:, 2], np.asarray(clients[KEY].a)[0, :, 2], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new[KEY].a)[:, 3], np.asarray(glob[KEY].a)[:, 3])
    np.testing.assert_array_equal(np.asarray(new[KEY].b)[3], np.asarray(glob[KEY].b)[3])
    # non-prefix masks: the reference (R) with w = p u
    A, _ = spec(clients[KEY])
    p = np.asarray(w, np.float64) / np.asarray(w, np.float64).sum()
    U = np.asarray(u, np.float64)
    want = ref_rowmean(A, U, p[:, None] * U, spec(glob[KEY])[0], renorm=True)
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, want, atol=1e-5)


def test_hafl_importance_weighting_and_score_state():
    glob, clients, w, masks, extras, p, M = one_module()
    agg = ag.rank1_adaptive(importance_weighted=True, score_beta=0.25)
    state0 = agg.init(single(glob))
    prev = {KEY: jnp.full(state0.scores[KEY].shape, 2.0)}
    new, st = agg.aggregate(single(glob), single(clients), w, single(masks), ag.ScoreState(prev),
                            extras={"scores": single(extras["scores"])})
    S = np.asarray(extras["scores"][KEY], np.float64)
    A, _ = spec(clients[KEY])
    want = ref_rowmean(A, M, p[:, None] * M * S, spec(glob[KEY])[0], renorm=True)
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, want, atol=1e-5)
    Sbar = 0.25 * 2.0 + 0.75 * np.einsum("k,ki->i", p, M * S)
    np.testing.assert_allclose(np.asarray(st.scores[KEY]), Sbar, atol=1e-6)


# ---------------------------------------------------------------- HetLoRA (sec. 3.2)


def _fro(A, B, m):
    return np.linalg.norm(B @ np.diag(m) @ A)


def test_hetlora_reference_sparsity_weights():
    glob, clients, w, masks, _, p, M = one_module()
    A, B = spec(clients[KEY])
    norms = np.array([_fro(A[k], B[k], M[k]) for k in range(len(p))])
    for data_weighted in (False, True):
        raw = norms * (p if data_weighted else 1.0)
        wk = raw / raw.sum()
        new, _ = run(ag.zero_padding(data_weighted=data_weighted), single(glob), single(clients), w,
                     single(masks))
        want = ref_rowmean(A, M, wk[:, None] * M, spec(glob[KEY])[0], renorm=False)
        np.testing.assert_allclose(np.asarray(new[KEY].a).T, want, atol=1e-5)
    got = np.asarray(ag.product_fro_norm(clients[KEY], masks[KEY]))
    np.testing.assert_allclose(got, norms, rtol=1e-5)


def test_T3_2a_equal_norms_equal_ranks_is_uniform_fedavg():
    glob, clients, w, masks, _, _, _ = one_module(ranks=(4, 4, 4, 4))
    f = clients[KEY]
    # same product norm: client k = orthogonal rotation of client 0 in rank space
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4, 4)))[0]
    a = jnp.einsum("nr,krs->kns", f.a[0], q)
    b = jnp.einsum("krs,rm->ksm", q, f.b[0])
    new, _ = run(ag.zero_padding(), single(glob), {KEY: LoraFactors(a, b)}, jnp.asarray([1.0, 2, 3, 4]),
                 single(masks))
    np.testing.assert_allclose(np.asarray(new[KEY].a), np.asarray(a).mean(0), atol=1e-5)


def test_T3_2b_c_weights_invariant_to_common_rescaling_and_zero_client():
    glob, clients, w, masks, _, _, _ = one_module()
    agg = ag.zero_padding()
    f = clients[KEY]
    new1, _ = run(agg, single(glob), single(clients), w, single(masks))
    new2, _ = run(agg, single(glob), {KEY: LoraFactors(f.a, 3.0 * f.b)}, w, single(masks))
    np.testing.assert_allclose(np.asarray(new2[KEY].a), np.asarray(new1[KEY].a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new2[KEY].b), 3.0 * np.asarray(new1[KEY].b), atol=1e-4)
    # B_0 = 0 -> client 0 has weight 0: equals running without it
    fz = LoraFactors(f.a, f.b.at[0].set(0.0))
    got, _ = run(agg, single(glob), {KEY: fz}, w, single(masks))
    drop = lambda x: x[1:]
    want, _ = run(agg, single(glob), jax.tree.map(drop, {KEY: fz}), w[1:], jax.tree.map(drop, single(masks)))
    np.testing.assert_allclose(np.asarray(got[KEY].a), np.asarray(want[KEY].a), atol=1e-5)
    # all norms zero -> falls back to p_k (= FedIT)
    f0 = LoraFactors(f.a, jnp.zeros_like(f.b))
    got0, _ = run(agg, single(glob), {KEY: f0}, w, single(masks))
    want0, _ = run(ag.fedit(), single(glob), {KEY: f0}, w, single(masks))
    np.testing.assert_allclose(np.asarray(got0[KEY].a), np.asarray(want0[KEY].a), atol=1e-6)


def test_hetlora_self_pruning_reference():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 6, 8))
    b = rng.normal(size=(2, 8, 5))
    m = (np.arange(8)[None] < np.array([[8], [5]])).astype(np.float32)
    tree = {"q": LoraFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    masks = {"q": jnp.asarray(m)}
    gamma = 0.7
    got = np.asarray(ag.hetlora_tail_norm(tree, masks, gamma=gamma)["q"])
    want = []
    for k, r in enumerate((8, 5)):
        lo = int(np.floor(gamma * r))
        want.append(np.linalg.norm(b[k, lo:r]) * np.linalg.norm(a[k, :, lo:r]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    reg = ag.hetlora_prune_regularizer(tree, masks, gamma=gamma, lam=0.1)
    np.testing.assert_allclose(float(reg), 0.1 * sum(want), rtol=1e-5)
    pruned = ag.hetlora_prune_masks(masks, {"q": jnp.asarray([1.0, 1.0])}, {"q": jnp.asarray([2.0, 0.5])},
                                    gamma=gamma)["q"]
    np.testing.assert_array_equal(np.asarray(pruned), [[1, 1, 1, 1, 1, 0, 0, 0], m[1]])  # floor(.7*8)=5
    with pytest.raises(ValueError, match="gamma"):
        ag.hetlora_tail_norm(tree, masks, gamma=1.5)


# ---------------------------------------------------------------- FlexLoRA (3.3)


def _dense_sum(p, clients, M, e=None):
    A, B = spec(clients)
    G = M if e is None else M * np.asarray(e, np.float64)
    return sum(p[k] * B[k] @ np.diag(G[k]) @ A[k] for k in range(len(p)))      # [d_out, d_in]


@pytest.mark.parametrize("split", ["b", "a", "sqrt"])
def test_T3_3a_flexlora_eckart_young_per_client(split):
    glob, clients, w, masks, _, p, M = one_module()
    agg = ag.flexlora(split=split)
    new, st = run(agg, single(glob), single(clients), w, single(masks))
    dW = _dense_sum(p, clients[KEY], M)
    sig = np.linalg.svd(dW, compute_uv=False)
    for rk in (1, 2, 3, 4):
        m = jnp.asarray(np.arange(4) < rk, jnp.float32)
        f = agg.distribute(new, {KEY: m}, st)[KEY]
        approx = (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)).T
        err2 = np.linalg.norm(dW - approx) ** 2
        np.testing.assert_allclose(err2, np.sum(sig[rk:] ** 2), rtol=1e-4)
        if split == "b":   # singular values in b (the paper's B): a has orthonormal columns
            np.testing.assert_allclose(np.asarray(f.a)[:, :rk].T @ np.asarray(f.a)[:, :rk], np.eye(rk),
                                       atol=1e-5)


def test_T3_3bc_flexlora_exact_when_rank_fits_and_single_client_roundtrip():
    glob, clients, w, masks, _, _, _ = one_module(ranks=(4,))
    one = jax.tree.map(lambda x: x[:1], (clients, masks))
    new, _ = run(ag.flexlora(), single(glob), single(one[0]), w[:1], single(one[1]))
    want = np.asarray(lora.delta(jax.tree.map(lambda x: x[0], one[0][KEY]), scale=1.0))
    np.testing.assert_allclose(np.asarray(lora.delta(new[KEY], scale=1.0)), want, atol=1e-4)


def test_T3_3d_flexlora_lowrank_path_equals_dense_path():
    case = make_case(4, ranks=(1, 2, 1, 1))           # C*R = 16 >= min(N, M); force both paths
    outs = [run(ag.flexlora(method=mth), *case[:4])[0] for mth in ("lowrank", "dense")]
    for k in outs[0]:
        np.testing.assert_allclose(np.asarray(lora.delta(outs[0][k], scale=1.0)),
                                   np.asarray(lora.delta(outs[1][k], scale=1.0)), atol=1e-4)


def test_flexlora_svd_form_puts_singular_values_in_e():
    glob, clients, w, masks, _, p, M = one_module(with_e=True)
    new, _ = run(ag.flexlora(), single(glob), single(clients), w, single(masks))
    dW = _dense_sum(p, clients[KEY], M, clients[KEY].e)
    sig = np.linalg.svd(dW, compute_uv=False)[:4]
    np.testing.assert_allclose(np.asarray(new[KEY].e), sig, rtol=1e-4)


# ---------------------------------------------------------------- FLoRA (3.4)


def test_T3_4a_flora_base_delta_is_exact_weighted_sum_of_products():
    glob, clients, w, masks, _, p, _ = make_case(0, garbage=100.0) + (None, None)
    p = np.asarray(w, np.float64) / float(np.sum(np.asarray(w, np.float64)))
    agg = ag.flora(scale=SCALE)
    state0 = agg.init(glob)
    state0 = ag.BaseDeltaState({k: v + 1.0 for k, v in state0.base_delta.items()})
    new, st = agg.aggregate(glob, clients, w, masks, state0)
    for k in glob:
        M = np.asarray(masks[k], np.float64)
        A, B = spec(clients[k])
        A = np.where(np.swapaxes(M, -1, -1)[..., :, None] > 0, A, 0)       # garbage rows -> 0
        B = np.where(M[..., None, :] > 0, B, 0)
        want = 1.0 + SCALE * np.einsum("k,k...or,k...r,k...rd->...do", p, B, M, A)
        np.testing.assert_allclose(np.asarray(st.base_delta[k]), want, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(new[k].b), 0)                 # fresh LoRA: b = 0
        np.testing.assert_array_equal(np.asarray(new[k].a), np.asarray(glob[k].a))


def test_T3_4b_flora_single_client():
    glob, clients, w, masks, _, _, _ = one_module()
    take = lambda t: jax.tree.map(lambda x: x[1:2], single(t))
    _, st = run(ag.flora(scale=SCALE), single(glob), take(clients), w[1:2], take(masks))
    want = lora.delta(jax.tree.map(lambda x: x[1], clients[KEY]), masks[KEY][1], scale=SCALE)
    np.testing.assert_allclose(np.asarray(st.base_delta[KEY]), np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------- FedEx-LoRA (3.5)


@pytest.mark.parametrize("averaging", ["zero_pad", "renorm"])
@pytest.mark.parametrize("ranks", [(4, 4, 4, 4), (2, 4, 3, 1)])
def test_T3_5a_d_fedex_exactness(averaging, ranks, x64):
    glob, clients, w, masks, _ = make_case(1, ranks=ranks, dtype=jnp.float64)
    w = w.astype(jnp.float64)
    p = np.asarray(w, np.float64) / np.asarray(w, np.float64).sum()
    agg = ag.fedex_lora(scale=SCALE, averaging=averaging)
    state0 = agg.init(glob)
    new, st = agg.aggregate(glob, clients, w, masks, state0)
    for k in glob:
        # float64 NumPy products (lora.delta computes in float32)
        eff = np.asarray(st.base_delta[k]) + SCALE * np.asarray(new[k].a) @ np.asarray(new[k].b)
        a, b, m = np.asarray(clients[k].a), np.asarray(clients[k].b), np.asarray(masks[k])
        want = sum(p[c] * SCALE * (a[c] * m[c][..., None, :]) @ b[c] for c in range(len(p)))
        np.testing.assert_allclose(eff, want, atol=1e-12)
        if ranks == (4, 4, 4, 4):  # T3.5c residual == factored RHS of (X)
            A, B = spec(clients[k])
            Abar, Bbar = np.einsum("k,k...rd->...rd", p, A), np.einsum("k,k...or->...or", p, B)
            rhs = sum(p[c] * (B[c] - Bbar) @ (A[c] - Abar) for c in range(len(p)))
            np.testing.assert_allclose(np.asarray(st.base_delta[k]), SCALE * np.swapaxes(rhs, -1, -2),
                                       atol=1e-12)


def test_T3_5b_fedex_identical_clients_zero_residual():
    glob, clients, w, masks, _ = make_case(2, ranks=(4, 4, 4, 4), identical=True)
    _, st = run(ag.fedex_lora(scale=SCALE), glob, clients, w, masks)
    for v in st.base_delta.values():
        np.testing.assert_allclose(np.asarray(v), 0.0, atol=1e-5)


# ---------------------------------------------------------------- FFA / FedSA (3.6, 3.7)


def test_T3_6_ffa_exact_with_heterogeneous_masks_and_a_untouched():
    glob, clients, w, masks, _, p, M = one_module(ranks=(2, 4, 3, 1))
    a_shared = glob[KEY].a
    f = LoraFactors(jnp.broadcast_to(a_shared, clients[KEY].a.shape) + 5.0, clients[KEY].b)  # client a ignored
    new, _ = run(ag.ffa_lora(), single(glob), {KEY: f}, w, single(masks))
    np.testing.assert_array_equal(np.asarray(new[KEY].a), np.asarray(a_shared))
    A = np.asarray(a_shared, np.float64).T
    _, B = spec(f)
    want = sum(p[k] * B[k] @ np.diag(M[k]) @ A for k in range(len(p)))
    np.testing.assert_allclose((np.asarray(new[KEY].a) @ np.asarray(new[KEY].b)).T, want, atol=1e-5)
    # per-slot renormalisation would NOT be exact (the spec's warning)
    renorm = ref_rowmean(B, M, p[:, None] * M, np.asarray(glob[KEY].b).T, renorm=True, rows=False)
    assert np.abs(renorm @ A - want).max() > 1e-2


def test_T3_7_fedsa_a_averaged_b_local():
    glob, clients, w, masks, _, p, M = one_module()
    agg = ag.fedsa_lora()
    new, st = run(agg, single(glob), single(clients), w, single(masks))
    np.testing.assert_array_equal(np.asarray(new[KEY].b), np.asarray(glob[KEY].b))
    A, _ = spec(clients[KEY])
    want = ref_rowmean(A, M, p[:, None] * M, spec(glob[KEY])[0], renorm=False)
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, want, atol=1e-5)
    own = jax.tree.map(lambda x: x[2], single(clients))
    out = agg.distribute(new, {KEY: masks[KEY][2]}, st, client_lora=own)[KEY]
    np.testing.assert_array_equal(np.asarray(out.b), np.asarray(own[KEY].b))      # T3.7a
    want_d = SCALE * (np.asarray(new[KEY].a) * np.asarray(masks[KEY][2])) @ np.asarray(own[KEY].b)  # T3.7c
    np.testing.assert_allclose(np.asarray(lora.delta(out, scale=SCALE)), want_d, atol=1e-5)


# ---------------------------------------------------------------- FedARA (fedara_legend 1.4)


@pytest.mark.parametrize("averaging", ["renorm", "zero_pad"])
def test_fedara_triplet_average_and_scores(averaging):
    glob, clients, w, masks, extras, p, M = one_module(with_e=True)
    agg = ag.fedara(averaging=averaging, score_beta=0.5)
    st0 = ag.ScoreState({KEY: jnp.ones(4)})
    new, st = agg.aggregate(single(glob), single(clients), w, single(masks), st0,
                            extras={"scores": single(extras["scores"])})
    A, B = spec(clients[KEY])
    wk = p[:, None] * M
    renorm = averaging == "renorm"
    np.testing.assert_allclose(np.asarray(new[KEY].a).T, ref_rowmean(A, M, wk, spec(glob[KEY])[0],
                                                                     renorm=renorm), atol=1e-5)
    E = np.asarray(clients[KEY].e, np.float64)[:, :, None]
    e_want = ref_rowmean(E, M, wk, np.asarray(glob[KEY].e)[:, None], renorm=renorm)[:, 0]
    np.testing.assert_allclose(np.asarray(new[KEY].e), e_want, atol=1e-5)
    S = np.asarray(extras["scores"][KEY], np.float64)
    np.testing.assert_allclose(np.asarray(st.scores[KEY]), 0.5 + 0.5 * np.einsum("k,ki->i", p, M * S), atol=1e-6)
    # no scores passed: state unchanged
    _, st2 = agg.aggregate(single(glob), single(clients), w, single(masks), st0)
    np.testing.assert_array_equal(np.asarray(st2.scores[KEY]), 1.0)


def test_to_np_helper_is_float64():
    assert to_np({"x": jnp.ones(2)})["x"].dtype == np.float64
