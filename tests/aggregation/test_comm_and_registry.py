"""Communication accounting against hand counts; registry and input validation."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import aggregation as ag
from fedlora_jax import lora
from fedlora_jax.lora import LoraFactors

# q: N=6, M=5 (plain); v: N=3, M=7 (with e); s: layer axis L=2, N=4, M=3 (plain). R=4, C=2.
TREE = {
    "q": LoraFactors(jnp.zeros((6, 4)), jnp.zeros((4, 5))),
    "v": LoraFactors(jnp.zeros((3, 4)), jnp.zeros((4, 7)), jnp.zeros((4,))),
    "s": LoraFactors(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 3))),
}


def _m(*ranks):
    return (np.arange(4) < np.asarray(ranks)[..., None]).astype(np.float32)


MASKS = {"q": jnp.asarray(_m(2, 4)), "v": jnp.asarray(_m(1, 3)), "s": jnp.asarray(_m([1, 2], [4, 0]))}
FULL = {k: jnp.ones((2,) + TREE[k].a.shape[:-2] + (4,)) for k in TREE}

# hand counts per client: q r(6+5), v r(3+7+1), s r(4+3) summed over layers
AB_E = [2 * 11 + 1 * 11 + 3 * 7, 4 * 11 + 3 * 11 + 4 * 7]          # [54, 105]
STACK = (2 + 4) * 11 + (1 + 3) * 10 + (1 + 2 + 4 + 0) * 7          # 66 + 40 + 49 = 155
DENSE = 6 * 5 + 3 * 7 + 2 * 4 * 3                                  # 30 + 21 + 24 = 75

HAND = {  # name, hparams, (up, down) per client
    "fedit": ({}, AB_E, AB_E),
    "zero_padding": ({}, AB_E, AB_E),
    "replication_padding": ({}, AB_E, AB_E),
    "rank1_adaptive": ({}, AB_E, AB_E),
    "flexlora": ({}, AB_E, AB_E),
    "flora": ({"scale": 1.0}, AB_E, [STACK, STACK]),
    "fedex_lora": ({"scale": 1.0}, AB_E, [AB_E[0] + DENSE, AB_E[1] + DENSE]),
    "ffa_lora": ({}, [2 * 5 + 1 * 8 + 3 * 3, 4 * 5 + 3 * 8 + 4 * 3], [2 * 5 + 1 * 8 + 3 * 3, 4 * 5 + 3 * 8 + 4 * 3]),
    "fedsa_lora": ({}, [2 * 6 + 1 * 3 + 3 * 4, 4 * 6 + 3 * 3 + 4 * 4], [2 * 6 + 1 * 3 + 3 * 4, 4 * 6 + 3 * 3 + 4 * 4]),
    "fedara": ({}, [AB_E[0] + 2 + 1 + 3, AB_E[1] + 4 + 3 + 4], AB_E),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_comm_params_and_bytes_equal_hand_counts(name):
    hp, up, down = HAND[name]
    agg = ag.get_aggregator(name, **hp)
    np.testing.assert_array_equal(np.asarray(ag.comm_params(agg, TREE, MASKS, direction="up")), up)
    np.testing.assert_array_equal(np.asarray(ag.comm_params(agg, TREE, MASKS, direction="down")), down)
    np.testing.assert_array_equal(np.asarray(ag.comm_bytes(agg, TREE, MASKS, direction="up")), 4 * np.asarray(up))
    np.testing.assert_array_equal(np.asarray(ag.comm_bytes(agg, TREE, MASKS, direction="down",
                                                           bytes_per_param=2)), 2 * np.asarray(down))


def test_comm_variants_and_single_client():
    flora_dense = ag.flora(scale=1.0, downlink="dense")
    np.testing.assert_array_equal(np.asarray(ag.comm_params(flora_dense, TREE, MASKS, direction="down")),
                                  [DENSE, DENSE])
    fedex_f = ag.fedex_lora(scale=1.0, residual_downlink="factored")
    np.testing.assert_array_equal(np.asarray(ag.comm_params(fedex_f, TREE, MASKS, direction="down")),
                                  [AB_E[0] + STACK, AB_E[1] + STACK])
    # HAFL downlink: the caller passes the forward mask (all ones) -> r_max (N + M [+1])
    hafl = ag.rank1_adaptive()
    np.testing.assert_array_equal(np.asarray(ag.comm_params(hafl, TREE, FULL, direction="down")),
                                  [4 * 11 + 4 * 11 + 8 * 7] * 2)
    summ = ag.comm_summary(hafl, TREE, MASKS, FULL)
    np.testing.assert_array_equal(np.asarray(summ["bytes_up"]), 4 * np.asarray(AB_E))
    one = {k: v[1] for k, v in MASKS.items()}
    assert int(ag.comm_params(ag.fedit(), TREE, one)) == AB_E[1]
    assert int(ag.comm_params(ag.fedit(), TREE, None)) == 4 * 11 + 4 * 11 + 8 * 7
    # bf16 storage: 2 bytes per param by default
    tree16 = {k: LoraFactors(f.a.astype(jnp.bfloat16), f.b.astype(jnp.bfloat16),
                             None if f.e is None else f.e.astype(jnp.bfloat16)) for k, f in TREE.items()}
    np.testing.assert_array_equal(np.asarray(ag.comm_bytes(ag.fedit(), tree16, MASKS)), 2 * np.asarray(AB_E))


def test_comm_matches_lora_count_params_for_plain_parts():
    agg = ag.fedit()
    want = sum(np.asarray(lora.count_params({k: TREE[k]}, {k: MASKS[k]})).reshape(2, -1).sum(1) for k in TREE)
    np.testing.assert_array_equal(np.asarray(ag.comm_params(agg, TREE, MASKS)), want)


def test_comm_rejects_bad_direction_and_masks():
    with pytest.raises(ValueError, match="direction"):
        ag.comm_params(ag.fedit(), TREE, MASKS, direction="sideways")
    with pytest.raises(ValueError, match="masks shape"):
        ag.comm_params(ag.fedit(), TREE, {**MASKS, "s": jnp.ones((2, 3, 4))})


# ---------------------------------------------------------------- registry


def test_registry_names_aliases_and_suggestions():
    assert set(ag.AGGREGATORS) == {"fedit", "zero_padding", "replication_padding", "rank1_adaptive", "flexlora",
                                   "flora", "fedex_lora", "ffa_lora", "fedsa_lora", "fedara",
                                   "mixed_padding"}
    assert ag.get_aggregator("HAFL").name == "rank1_adaptive"
    assert ag.get_aggregator("hetlora").name == "zero_padding"
    assert ag.get_aggregator("FedEx-LoRA", scale=0.5).name == "fedex_lora"
    with pytest.raises(ValueError, match="did you mean 'flexlora'"):
        ag.get_aggregator("flexlorra")
    with pytest.raises(ValueError, match="unknown aggregator"):
        ag.get_aggregator("xyz")
    with pytest.raises(TypeError):
        ag.get_aggregator("flexlora", bogus=1)


@pytest.mark.parametrize("call, match", [
    (lambda: ag.flora(scale=-1.0), "scale"),
    (lambda: ag.fedex_lora(scale=float("nan")), "scale"),
    (lambda: ag.flexlora(split="c"), "split"),
    (lambda: ag.replication_padding(variant="median"), "variant"),
    (lambda: ag.zero_padding(weighting="size"), "weighting"),
    (lambda: ag.fedara(score_beta=1.0), "score_beta"),
    (lambda: ag.fedsa_lora(averaging="x"), "averaging"),
])
def test_factories_reject_bad_hparams(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_aggregate_validates_shapes_before_tracing():
    g = {"q": TREE["q"]}
    c = {"q": LoraFactors(jnp.zeros((2, 6, 4)), jnp.zeros((2, 4, 5)))}
    m = {"q": MASKS["q"]}
    agg = ag.fedit()
    with pytest.raises(ValueError, match=r"weights must have shape \[C\]"):
        agg.aggregate(g, c, jnp.ones((2, 1)), m, agg.init(g))
    with pytest.raises(ValueError, match="client a has shape"):
        agg.aggregate(g, c, jnp.ones(3), m, agg.init(g))
    with pytest.raises(ValueError, match="masks shape"):
        agg.aggregate(g, c, jnp.ones(2), {"q": jnp.ones((2, 3))}, agg.init(g))
    with pytest.raises(ValueError, match="keys"):
        agg.aggregate(g, {"k": c["q"]}, jnp.ones(2), m, agg.init(g))
    with pytest.raises(TypeError, match="extras"):
        agg.aggregate(g, c, jnp.ones(2), m, agg.init(g), extras=[1])
    with pytest.raises(ValueError, match="needs extras"):
        ag.rank1_adaptive(importance_weighted=True).aggregate(g, c, jnp.ones(2), m, ag.rank1_adaptive().init(g))
    with pytest.raises(ValueError, match="expected"):
        ag.fedara().aggregate(g, c, jnp.ones(2), m, ag.fedara().init(g), extras={"scores": {"q": jnp.ones(4)}})
