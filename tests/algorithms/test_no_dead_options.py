"""No option may be accepted and ignored.

The test walks every algorithm's options (the keyword-only parameters of its factory in
``BUILDERS``) and every option of the aggregator factory each algorithm uses (reached
through ``AlgoContext.aggregator_options``), and checks that each one, set to a non-default
value, either changes what the run computes or is refused with an error that names it.

How an option may bite (``ALTERNATIVES[(algorithm, option)] = (value, how)``):

- ``"state"``: the same rounds (same seed, same data, same client sampling) with the
  default and with the alternative end in a different server state (``lora``, ``head``,
  ``algo``, ``clients``, or ``agg_state`` where it holds the model's ``base_delta``; beyond
  float round-off) or give different plans (the host masks of some round).
- ``"refused"``: building or running raises ``ValueError`` / ``TypeError`` whose message
  names the option (only where the combination is meaningless, e.g. HAFL's default freeze
  mode with the aggregator's ``score_beta``).
- ``"comm"``: the option only changes what is sent (``Aggregator.uplink_parts`` /
  ``downlink_parts``): the bytes of :func:`fedlora_jax.aggregation.round_bytes` differ.
- ``"program"`` (:data:`PROGRAM_ONLY`): documented as computing the same numbers through
  a different program; the program must differ.
- ``"grad"``: documented as changing only the derivative of the aggregation (the round
  never differentiates through it); the gradient must differ where the rule matters.

A new option that is not in :data:`ALTERNATIVES` fails :func:`test_table_covers_every_option`.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import algo_rounds as ar
from helpers import tiny

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.aggregation import AGGREGATORS
from fedlora_jax.aggregation import base as agg_base
from fedlora_jax.algorithms import build_algorithm
from fedlora_jax.algorithms import fedara as fedara_lib
from fedlora_jax.algorithms.base import option_defaults
from fedlora_jax.algorithms.registry import BUILDERS
from fedlora_jax.lora import LoraFactors

AGG = "agg:"

#: ``(algorithm, option) -> (alternative value, how it bites)``; ``"agg:x"`` = aggregator option ``x``.
ALTERNATIVES = {
    # static-rank baselines: only aggregator options
    ("hetlora", AGG + "weighting"): ("data", "state"),
    ("hetlora", AGG + "data_weighted"): (True, "state"),
    ("replication", AGG + "variant"): ("copy", "state"),
    ("flexlora", AGG + "split"): ("a", "state"),
    ("flexlora", AGG + "method"): ("lowrank", "program"),
    ("flexlora", AGG + "gradient_safe"): (False, "grad"),
    ("flora", AGG + "scale"): (1.0, "refused"),  # the algorithm passes ctx.scale itself
    ("flora", AGG + "downlink"): ("dense", "comm"),
    ("fedex", AGG + "scale"): (1.0, "refused"),  # the algorithm passes ctx.scale itself
    ("fedex", AGG + "averaging"): ("renorm", "state"),
    ("fedex", AGG + "residual_downlink"): ("factored", "comm"),
    ("fedsa", AGG + "averaging"): ("renorm", "state"),
    # HAFL
    ("hafl", "mode"): ("truncate", "state"),
    ("hafl", "first_round_init"): ("random", "state"),
    ("hafl", "importance"): ("sensitivity_uncertainty", "state"),
    ("hafl", AGG + "importance_weighted"): (True, "state"),
    ("hafl", AGG + "score_beta"): (0.5, "refused"),  # default mode="freeze" has no global scores
    # FedARA
    ("fedara", "target_rank"): (2, "state"),
    ("fedara", "orth_reg"): (0.0, "state"),
    ("fedara", "orth_form"): ("fro_sq", "state"),
    ("fedara", "orth_warmup_frac"): (0.5, "state"),
    ("fedara", "lambda_lr_scale"): (1.0, "state"),
    ("fedara", "t_init_frac"): (0.0, "state"),
    ("fedara", "t_final_frac"): (0.0, "state"),
    ("fedara", "mask_interval"): (2, "state"),
    ("fedara", "r_min"): (2, "state"),
    ("fedara", "static_cut"): (True, "program"),
    ("head_only", "static_cut"): (False, "program"),
    ("fedara", AGG + "averaging"): ("zero_pad", "refused"),  # one shared mask: renorm == zero_pad
    ("fedara", AGG + "score_beta"): (0.0, "state"),  # the algorithm's default is 0.5
    # AdaLoRA-in-FL
    ("adalora", "target_rank"): (2, "state"),
    ("adalora", "orth_reg"): (0.0, "state"),
    ("adalora", "orth_form"): ("fro_sq", "state"),
    ("adalora", "orth_warmup_frac"): (0.5, "state"),
    ("adalora", "lambda_lr_scale"): (1.0, "state"),
    ("adalora", "t_init_frac"): (0.0, "state"),
    ("adalora", "t_final_frac"): (0.0, "state"),
    ("adalora", "mask_interval"): (2, "state"),
    ("adalora", AGG + "averaging"): ("zero_pad", "refused"),  # all-ones masks: renorm == zero_pad
    ("adalora", AGG + "score_beta"): (0.0, "state"),  # the algorithm's default is 0.5
    # LEGEND (host-side options: plan and observe)
    ("legend", "r_min"): (2, "state"),
    ("legend", "rho"): (0.5, "state"),
    ("legend", "placement"): ("bottom", "state"),
    ("legend", "deadline"): ("between", "state"),
    ("legend", "slope"): (2, "state"),
    ("legend", AGG + "variant"): ("copy", "state"),
}

#: Options documented as leaving the numbers alone and changing the compiled program:
#: FedARA ``static_cut`` makes the driver compile one round per lowest active layer with the
#: backward pass below it removed statically (``static_grad_cut``, tested in
#: ``tests/federated/test_round.py``); the harness builds one round, so here only the flag
#: the driver reads is checked (head_only's, default on: the same numbers as the full backward,
#: tested through the driver in ``tests/driver/test_algorithms_e2e.py``). FlexLoRA ``method``
#: picks the SVD path (dense vs QR core).
PROGRAM_ONLY = {("fedara", "static_cut"), ("head_only", "static_cut"), ("flexlora", AGG + "method")}

#: Options accepted and ignored (bugs found by this test): ``(algorithm, option) -> reason``.
DEAD: dict = {}  # was: fedara/adalora aggregator ``averaging`` (now refused by the algorithms)


#: Aggregator-option defaults an algorithm sets itself (instead of the factory's).
ALGO_AGG_DEFAULTS = {("fedara", AGG + "score_beta"): fedara_lib.DEFAULT_SCORE_BETA,
                     ("adalora", AGG + "score_beta"): fedara_lib.DEFAULT_SCORE_BETA}

#: Harness settings per algorithm, chosen so that the options can bite.
#: AdaLoRA: 4 rounds = warm-up 1, two budget rounds, final 1 (allocation happens). FedARA: 6
#: rounds (warm-up 2, two budget rounds, final 2): its masks are nested, so the aggregator's
#: ``score_beta`` only shows once the smoothed scores of several rounds meet at the first cut.
#: LEGEND: a fixed deadline at which both device types get intermediate ramps, and devices
#: slower than their profile so the capacity estimates (``rho``) move.
SETTINGS = {
    "fedara": dict(rounds=6),
    "adalora": dict(rounds=4),
    "hafl": dict(rounds=3),
    "legend": dict(rounds=3, deadline_s=3.0e-4, speed=np.full(ar.POPULATION, 0.6)),
}
DEFAULT_SETTINGS = dict(rounds=2)

#: Options that only change the host-side plan / observe: their runs reuse the baseline's
#: compiled round (checked: same client options, no server update differences).
HOST_ONLY = {("legend", o) for o in ("r_min", "rho", "placement", "deadline", "slope")} | {
    ("hafl", "first_round_init")}

#: Extra combinations: ``(algorithm, base options, base aggregator options, option, alternative)``.
#: HAFL's aggregator ``score_beta`` is refused in freeze mode but must bite in truncate mode.
COMBOS = [("hafl", {"mode": "truncate"}, {}, AGG + "score_beta", 0.5)]


# ----------------------------------------------------------------------------- enumeration


def _aggregator_factory(algorithm: str):
    algo = build_algorithm(algorithm, ar.context())
    name = algo.aggregator.name
    name = agg_base.ALIASES.get(name, name)
    return AGGREGATORS[name]


def _kw_only(fn) -> dict:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def enumerate_options() -> set:
    found = set()
    for name, build in BUILDERS.items():
        found |= {(name, o) for o in option_defaults(build)}
        found |= {(name, AGG + o) for o in _kw_only(_aggregator_factory(name))}
    return found


def test_table_covers_every_option():
    found = enumerate_options()
    missing = sorted(found - set(ALTERNATIVES))
    stale = sorted(set(ALTERNATIVES) - found)
    assert not missing, f"options not walked (add them to ALTERNATIVES with a non-default value): {missing}"
    assert not stale, f"ALTERNATIVES names options that no longer exist: {stale}"
    for key in PROGRAM_ONLY | set(DEAD) | HOST_ONLY:
        assert key in ALTERNATIVES, key


@pytest.mark.parametrize("key", sorted(ALTERNATIVES))
def test_alternative_is_not_the_default(key):
    algorithm, option = key
    value, _ = ALTERNATIVES[key]
    if option.startswith(AGG):
        default = _kw_only(_aggregator_factory(algorithm))[option[len(AGG):]]
        # An algorithm may set its own default for an aggregator option (FedARA's score_beta).
        default = ALGO_AGG_DEFAULTS.get(key, default)
    else:
        default = option_defaults(BUILDERS[algorithm])[option]
    assert value != default, (key, value)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_unknown_option_is_refused(name):
    with pytest.raises(ValueError, match="no_such_option"):
        build_algorithm(name, ar.context(), no_such_option=1)


# ----------------------------------------------------------------------------- running


def _split(option, value):
    """``(options, aggregator_options)`` for one option set to ``value``."""
    return ({}, {option[len(AGG):]: value}) if option.startswith(AGG) else ({option: value}, {})


def _run(algorithm, options=None, agg_options=None, round_fn=None):
    s = dict(SETTINGS.get(algorithm, DEFAULT_SETTINGS))
    rounds, speed = s.pop("rounds"), s.pop("speed", None)
    state, hist, rf = ar.run(algorithm, rounds=rounds, options=options or {}, round_fn=round_fn, speed=speed,
                             aggregator_options=agg_options or {}, return_history=True, **s)
    return state, [h[0] for h in hist], rf


@functools.cache
def _baseline(algorithm, base_options=(), base_agg=()):
    return _run(algorithm, dict(base_options), dict(base_agg))


FIELDS = ("lora", "head", "algo", "clients", "agg_state")


def _close(x, y) -> bool:
    if ar.leaves_differ(jax.tree.map(np.shape, x), jax.tree.map(np.shape, y)):
        return False
    return all(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)
               for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


def _state_diff(s0, s1) -> list[str]:
    """Fields of the final server state that differ beyond float round-off.

    ``agg_state`` counts only where it holds part of the model (FLoRA / FedEx-LoRA's
    ``base_delta``); smoothed scores that move no mask, adapter or plan do not count.
    """
    fields = [f for f in FIELDS if not _close(getattr(s0, f), getattr(s1, f))]
    if "agg_state" in fields and not isinstance(s0.agg_state, agg_lib.BaseDeltaState):
        fields.remove("agg_state")
    return fields


def _plan_diff(p0, p1) -> list[int]:
    """Rounds whose plans (masks, update masks, depth mask, global masks) differ."""
    out = []
    for r, (a, b) in enumerate(zip(p0, p1, strict=True)):
        ta = (a.masks, a.update_masks, a.depth_mask, a.global_masks)
        tb = (b.masks, b.update_masks, b.depth_mask, b.global_masks)
        if ar.leaves_differ(ta, tb):
            out.append(r)
    return out


def _names_option(err: Exception, option: str) -> bool:
    return option[len(AGG):] in str(err) if option.startswith(AGG) else option in str(err)


def _check_state(algorithm, option, value, base_options=None, base_agg=None):
    base_options, base_agg = dict(base_options or {}), dict(base_agg or {})
    s0, p0, rf0 = _baseline(algorithm, tuple(sorted(base_options.items())), tuple(sorted(base_agg.items())))
    opts, agg = _split(option, value)
    opts, agg = {**base_options, **opts}, {**base_agg, **agg}
    reuse = None
    if (algorithm, option) in HOST_ONLY:
        a0 = build_algorithm(algorithm, ar.context(), **base_options)
        a1 = build_algorithm(algorithm, ar.context(), **opts)
        assert a1.client == a0.client and a1.aggregator.name == a0.aggregator.name
        assert (a1.server_update is None) == (a0.server_update is None)
        reuse = rf0
    if reuse is None:  # cached: HAFL's mode="truncate" run is also the base of a combination
        s1, p1, _ = _baseline(algorithm, tuple(sorted(opts.items())), tuple(sorted(agg.items())))
    else:
        s1, p1, _ = _run(algorithm, opts, agg, round_fn=reuse)
    fields, rounds = _state_diff(s0, s1), _plan_diff(p0, p1)
    assert fields or rounds, (f"{algorithm} option {option}={value!r} is accepted and changes nothing: same final "
                              f"state ({', '.join(FIELDS)}) and same plans as the default")


def _check_refused(algorithm, option, value):
    opts, agg = _split(option, value)
    with pytest.raises((ValueError, TypeError)) as info:
        _run(algorithm, opts, agg)
    assert _names_option(info.value, option), f"error does not name {option!r}: {info.value}"


# ----------------------------------------------------------------------------- aggregator-level checks


def _client_inputs(c=3, seed=0, identical=False, modules=None):
    """Client factors ``[C, N, R]`` / ``[C, R, M]`` of the tiny shapes, prefix masks of ranks 1, 2, 4
    (``modules``: only the first few adapter keys)."""
    key = jax.random.key(seed)
    lora = {}
    for i, k in enumerate(tiny.keys()[:modules]):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        a = jax.random.normal(ka, (c, tiny.D, ar.R))
        b = jax.random.normal(kb, (c, ar.R, tiny.D))
        if identical:
            a, b = jnp.broadcast_to(a[:1], a.shape), jnp.broadcast_to(b[:1], b.shape)
        lora[k] = LoraFactors(a, b, None)
    ranks = np.array([1, 2, 4])[:c] if not identical else np.ones(c, int)
    m = (np.arange(ar.R)[None, :] < ranks[:, None]).astype(np.float32)
    masks = {k: jnp.asarray(m) for k in lora}
    glob = {k: v for k, v in ar.init_lora("a_random_b_zero").items() if k in lora}
    return glob, lora, jnp.arange(1.0, c + 1.0), masks


def _aggregator(algorithm, agg_options):
    """The aggregator the algorithm builds with ``agg_options`` (through the algorithm)."""
    return build_algorithm(algorithm, ar.context(aggregator_options=agg_options)).aggregator


def _check_comm(algorithm, option, value):
    _, agg = _split(option, value)
    a0, a1 = _aggregator(algorithm, {}), _aggregator(algorithm, agg)
    glob, _, _, masks = _client_inputs()
    head = tiny.init_head(jax.random.key(0))
    b0 = agg_lib.round_bytes(a0, glob, head, masks, masks)
    b1 = agg_lib.round_bytes(a1, glob, head, masks, masks)
    assert (a0.uplink_parts, a0.downlink_parts) != (a1.uplink_parts, a1.downlink_parts)
    assert not (np.array_equal(b0[0], b1[0]) and np.array_equal(b0[1], b1[1])), (b0, b1)


def _check_program(algorithm, option, value):
    if option == "static_cut":
        a0 = build_algorithm(algorithm, ar.context())
        a1 = build_algorithm(algorithm, ar.context(), static_cut=value)
        assert a0.static_cut is not value and a1.static_cut is value
        assert a1.options["static_cut"] is value
        return
    _, agg = _split(option, value)
    a0, a1 = _aggregator(algorithm, {}), _aggregator(algorithm, agg)
    glob, lora, w, masks = _client_inputs(modules=1)
    state = a0.init(glob)
    f0 = lambda lo: a0.aggregate(glob, lo, w, masks, state)[0]
    f1 = lambda lo: a1.aggregate(glob, lo, w, masks, state)[0]
    assert str(jax.make_jaxpr(f0)(lora)) != str(jax.make_jaxpr(f1)(lora)), "same program"
    # Same numbers by design (products: the factors' signs/order are canonical).
    for k in glob:
        p0, p1 = (jnp.einsum("nr,rm->nm", o[k].a, o[k].b) for o in (f0(lora), f1(lora)))
        np.testing.assert_allclose(p0, p1, rtol=1e-4, atol=1e-4)


def _check_grad(algorithm, option, value):
    """FlexLoRA ``gradient_safe``: at a rank-deficient point (identical rank-1 clients, so
    repeated zero singular values) the default's gradient through the SVD is finite and the
    alternative's (JAX's own SVD rule) is a different one."""
    _, agg = _split(option, value)
    a0, a1 = _aggregator(algorithm, {}), _aggregator(algorithm, agg)
    glob, lora, w, masks = _client_inputs(identical=True, modules=1)
    state = a0.init(glob)

    def loss(agg_, lo):
        out = agg_.aggregate(glob, lo, w, masks, state)[0]
        return sum(jnp.sum(jnp.sin(f.a)) + jnp.sum(jnp.sin(f.b)) for f in out.values())

    g0 = jax.jit(jax.grad(functools.partial(loss, a0)))(lora)
    g1 = jax.jit(jax.grad(functools.partial(loss, a1)))(lora)
    fin = lambda g: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    assert fin(g0), "default gradient_safe=True gives non-finite gradients"
    assert ar.leaves_differ(g0, g1), "gradients are identical"


CHECKS = {"state": _check_state, "refused": _check_refused, "comm": _check_comm, "program": _check_program,
          "grad": _check_grad}


def _cases():
    out = []
    for key in sorted(ALTERNATIVES):
        value, how = ALTERNATIVES[key]
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=DEAD[key])] if key in DEAD else []
        out.append(pytest.param(*key, value, how, marks=marks, id=f"{key[0]}-{key[1]}"))
    return out


@pytest.mark.parametrize("algorithm,option,value,how", _cases())
def test_option_bites_or_is_refused(algorithm, option, value, how):
    assert (how == "program") == ((algorithm, option) in PROGRAM_ONLY)
    CHECKS[how](algorithm, option, value)


@pytest.mark.parametrize("algorithm,base_options,base_agg,option,value", COMBOS)
def test_option_bites_in_combination(algorithm, base_options, base_agg, option, value):
    _check_state(algorithm, option, value, base_options, base_agg)
