"""Same seed -> bit-identical round on CPU; different seeds differ; server-side update clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import tiny
from reliability import _tiny_round as tr

from fedlora_jax import aggregation
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms import ClientOptions
from fedlora_jax.federated import client_update, init_server_state, make_round, make_spec


def _run(seed, *, rounds=2, round_fn=None):
    t = tr.build(seed, round_fn=round_fn)
    state, metrics = t.state, None
    for r in range(rounds):
        state, metrics = t.round_fn(state, t.batch, t.spec, jax.random.fold_in(jax.random.key(seed), r), t.base)
    return jax.device_get((state, metrics)), t.round_fn


def _leaves_equal(x, y):
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(lx) == len(ly)
    for a, b in zip(lx, ly, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_bit_identical_and_different_seed_differs():
    (s1, m1), rf1 = _run(0)
    (s2, m2), _ = _run(0)  # a fresh model, round function and compile
    _leaves_equal((s1.lora, s1.head, s1.agg_state, s1.round), (s2.lora, s2.head, s2.agg_state, s2.round))
    _leaves_equal({k: m1[k] for k in ("client_loss", "client_update_norm", "train_loss")},
                  {k: m2[k] for k in ("client_loss", "client_update_norm", "train_loss")})
    (s3, _), _ = _run(1, round_fn=rf1)  # other seed: other model weights, adapter, data
    (s4, _), _ = _run(0, round_fn=rf1)  # the same executable again, same inputs
    assert rf1.trace_count() == 1
    _leaves_equal(s1.lora, s4.lora)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(s1.lora), jax.tree.leaves(s3.lora), strict=True))


# ------------------------------------------------------------------ update-norm clipping

R = 4


def _clip_setup(c=3, s=3, b=4):
    key = jax.random.key(11)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    glob = lora_lib.init(jax.random.fold_in(key, 3), tiny.shapes(), R, std=0.2)
    glob = {k: lora_lib.LoraFactors(f.a, 0.1 * jax.random.normal(jax.random.fold_in(key, 9 + i), f.b.shape))
            for i, (k, f) in enumerate(sorted(glob.items()))}
    data = tiny.batches(jax.random.fold_in(key, 4), c, s, b)
    masks = {k: np.ones((c, R), np.float32) for k in tiny.keys()}
    spec = make_spec(masks, num_steps=[s] * c, weight=[1.0, 2.0, 3.0], client_id=np.arange(c), num_layers=tiny.L,
                     layer_of_key={k: i for i, k in enumerate(tiny.keys())})
    return base, head, glob, data, spec


def _client_results(base, head, glob, data, spec, key, opt):
    """Python loop over clients: (start, trained) adapters of each, as float64 NumPy."""
    agg = aggregation.fedit()
    update = jax.jit(lambda tr_, b, sp, k: client_update(tiny.TASK, opt, ClientOptions(), tr_, base,
                                                         b, sp, k))
    out = []
    for i in range(spec.weight.shape[0]):
        sp = jax.tree.map(lambda x: x[i], spec)
        start = agg.distribute(glob, sp.masks, ())
        res = update({"lora": start, "head": head}, jax.tree.map(lambda x: x[i], data), sp,
                     jax.random.fold_in(key, sp.client_id))
        f64 = lambda tree: {k: (np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)) for k, f in tree.items()}
        out.append((f64(start), f64(res.lora)))
    return out


def _numpy_clipped_fedavg(results, weights, clip):
    """Clip each client's flattened (a, b) update to norm ``clip``, then FedAvg (NumPy)."""
    clipped, norms = [], []
    for start, trained in results:
        deltas = {k: (trained[k][0] - start[k][0], trained[k][1] - start[k][1]) for k in start}
        norm = np.sqrt(sum(np.sum(da**2) + np.sum(db**2) for da, db in deltas.values()))
        factor = min(1.0, clip / norm)
        clipped.append({k: (start[k][0] + factor * da, start[k][1] + factor * db) for k, (da, db) in deltas.items()})
        norms.append(norm)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    c = len(results)
    avg = {k: (sum(w[i] * clipped[i][k][0] for i in range(c)), sum(w[i] * clipped[i][k][1] for i in range(c)))
           for k in clipped[0]}
    return avg, np.asarray(norms)


def test_clip_update_norm_matches_numpy():
    base, head, glob, data, spec = _clip_setup()
    opt = optax.adam(5e-2)
    key = jax.random.key(5)
    agg = aggregation.fedit()
    results = _client_results(base, head, glob, data, spec, key, opt)
    unclipped, ref_norms = _numpy_clipped_fedavg(results, spec.weight, np.inf)
    clip = float(np.median(ref_norms))  # clips the largest update, leaves the smallest alone
    assert ref_norms.min() < clip < ref_norms.max()
    ref, _ = _numpy_clipped_fedavg(results, spec.weight, clip)
    assert not np.allclose(ref["layer.0.fc"][0], unclipped["layer.0.fc"][0], rtol=1e-4, atol=1e-6)
    rf = make_round(tiny.TASK, agg, optimizer=opt, chunk_size=2, clip_update_norm=clip)
    state, m = rf(init_server_state(glob, head, agg), data, spec, key, base)
    np.testing.assert_allclose(np.asarray(m["client_update_norm"]), ref_norms, rtol=1e-5)
    for k in glob:
        np.testing.assert_allclose(np.asarray(state.lora[k].a), ref[k][0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(state.lora[k].b), ref[k][1], rtol=2e-5, atol=2e-6)


def test_clipped_contribution_has_norm_at_most_clip():
    """One client, weight 1: the new global minus the start is that client's clipped update."""
    base, head, glob, data, spec = _clip_setup()
    one = jax.tree.map(lambda x: x[:1], spec)
    data1 = jax.tree.map(lambda x: x[:1], data)
    agg = aggregation.fedit()
    clip = 1e-3
    rf = make_round(tiny.TASK, agg, optimizer=optax.adam(5e-2), chunk_size=1, clip_update_norm=clip)
    state, m = rf(init_server_state(glob, head, agg), data1, one, jax.random.key(0), base)
    assert float(m["client_update_norm"][0]) > clip
    sq = sum(float(jnp.sum((state.lora[k].a - glob[k].a) ** 2) + jnp.sum((state.lora[k].b - glob[k].b) ** 2))
             for k in glob)
    np.testing.assert_allclose(np.sqrt(sq), clip, rtol=1e-3)
