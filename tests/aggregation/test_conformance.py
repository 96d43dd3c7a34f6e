"""One conformance battery over every registered aggregator configuration, via the public kit
:mod:`fedlora_jax.testing` (the same checks a user runs on their own aggregator)."""

import jax
import jax.numpy as jnp
import pytest
from aggregation._agg_cases import (
    CONFIG_IDS,
    CONFIGS,
    MODULES,
    RANKS,
    SCALE,
    assert_trees_close,
    build,
    params_marking_variants_slow,
)
from aggregation._agg_cases import make_case as internal_case

from fedlora_jax import aggregation as ag
from fedlora_jax import testing as kit

ALL = pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
# vmap over rounds compiles a batched program per config: variants run under -m slow
PRIMARY_ONLY = pytest.mark.parametrize("cfg", params_marking_variants_slow())
SHAPES = {k: lead + (n, m) for k, (lead, n, m) in MODULES.items()}


def _kw(cfg):
    """The case every check below draws: the modules, ranks and extras of ``_agg_cases``."""
    return {"shapes": SHAPES, "ranks": RANKS, "with_e": cfg[3], "extras": "scores"}


def test_every_registered_name_is_covered():
    assert {c[1] for c in CONFIGS} == set(ag.AGGREGATORS)


@pytest.mark.parametrize("kw", [{}, {"with_e": True, "dtype": jnp.bfloat16}, {"garbage": 1e3, "with_e": True},
                                {"nan": True}, {"identical": True, "ranks": (3, 3, 3, 3)}, {"seed": 5}])
def test_public_make_case_draws_the_internal_cases(kw):
    """The kit's cases are the ones this suite was written against (same draws, same tolerances)."""
    kw = dict(kw)
    seed = kw.pop("seed", 0)
    want = internal_case(seed, **kw)
    got = kit.make_case(seed, shapes=SHAPES, r_max=4, **{"ranks": RANKS, **kw})
    assert_trees_close(tuple(got), want, atol=0, rtol=0)
    assert jax.tree.map(lambda x: x.dtype, tuple(got)) == jax.tree.map(lambda x: x.dtype, want)


@ALL
def test_contract_fields(cfg):
    kit.check_contract(build(cfg), name=cfg[1])


@ALL
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes_kept(cfg, dtype):
    kit.check_shapes_and_dtypes(build(cfg), dtypes=(dtype,), **_kw(cfg))


@ALL
@pytest.mark.parametrize("nan", [False, True])
def test_masked_client_slots_never_leak(cfg, nan):
    kit.check_masked_slots_do_not_leak(build(cfg), fills=("nan" if nan else "garbage",), garbage=1e3,
                                       atol=1e-6, rtol=1e-6, **_kw(cfg))


@ALL
def test_permuting_clients_changes_nothing(cfg):
    kit.check_permutation_invariance(build(cfg), perm=(2, 0, 3, 1), atol=2e-5, rtol=2e-5, **_kw(cfg))


@ALL
def test_zero_weight_client_changes_nothing(cfg):
    kit.check_zero_weight_clients(build(cfg), atol=2e-5, rtol=2e-5, **_kw(cfg))


@ALL
def test_all_zero_weights_keep_previous_global(cfg):
    kit.check_all_zero_weights_keep_global(build(cfg), **_kw(cfg))


@ALL
def test_scaling_weights_changes_nothing(cfg):
    kit.check_weight_scale_invariance(build(cfg), scale=7.0, atol=2e-5, rtol=2e-5, **_kw(cfg))


@ALL
def test_identical_clients_give_back_that_client(cfg):
    # FFA-LoRA (a frozen and shared: clients hold the global a) is inferred from its uplink_parts
    agg = build(cfg)
    assert (cfg[1] == "ffa_lora") == ("a" not in agg.uplink_parts and "b" in agg.uplink_parts)
    kit.check_identical_clients(agg, scale=SCALE, rank=3, atol=2e-5, rtol=2e-5, **_kw(cfg))


@ALL
def test_jit_equals_eager(cfg):
    kit.check_jit_matches_eager(build(cfg), atol=2e-5, rtol=2e-5, **_kw(cfg))


@PRIMARY_ONLY
def test_vmap_over_rounds(cfg):
    kit.check_vmap_over_rounds(build(cfg), seeds=(1, 2), atol=2e-5, rtol=2e-5, **_kw(cfg))


@ALL
def test_distribute_is_vmappable_and_masks_exact(cfg):
    # client_lora is passed to every method: FedSA-LoRA uses it, the contract says others ignore it
    kit.check_distribute(build(cfg), client=1, **_kw(cfg))


def test_check_aggregator_runs_the_whole_battery_on_a_registered_method():
    kit.check_aggregator(ag.fedit(), shapes=SHAPES, ranks=RANKS)


def test_check_aggregator_rejects_unknown_check_names():
    with pytest.raises(ValueError, match="unknown checks"):
        kit.check_aggregator(ag.fedit(), skip=("masked",))
