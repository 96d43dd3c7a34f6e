"""Conformance battery for :class:`~fedlora_jax.aggregation.Aggregator` implementations.

In the spirit of ``chex`` / ``optax`` test helpers: call :func:`check_aggregator` on your own
aggregator inside a test (or a script); it returns ``None`` when every property holds and raises
``AssertionError`` naming the failed property, the output leaf (``new_global['module'].a``,
``state.base_delta['module']``, ...) and the worst index (the last axis of ``a`` / ``e`` and the
second-to-last of ``b`` are the rank slots)::

    from fedlora_jax.testing import check_aggregator
    check_aggregator(my_aggregator)                      # every check of ALL_CHECKS
    check_aggregator(my_aggregator, skip=("grad",))      # e.g. a non-differentiable method

Properties (names of :data:`ALL_CHECKS`, each also a public function ``check_<...>``):

- ``contract``: an :class:`Aggregator` with valid ``uplink_parts`` / ``downlink_parts``.
- ``shapes_and_dtypes``: outputs keep every factor's shape and dtype (float32 and bfloat16),
  are finite, ``e is None`` stays ``None``; a ``state.base_delta`` is ``[..., N, M]`` float32.
- ``masked_slots``: garbage (large random or NaN) in the clients' masked slots never leaks.
- ``permutation``: permuting the clients (weights, masks, extras alike) changes nothing.
- ``weight_scale``: multiplying every raw weight by a constant changes nothing.
- ``zero_weight``: an extra client with weight 0 and all-NaN factors changes nothing.
- ``all_zero_weights``: all weights 0 return the previous global and state exactly.
- ``identical_clients``: identical clients give back that client's effective update
  (distributed adapter, plus any ``state.base_delta`` fold into the base).
- ``jit``: ``jax.jit(aggregate)`` equals eager.
- ``vmap``: ``jax.vmap`` over a stack of rounds equals a loop over them.
- ``distribute``: ``distribute`` is vmappable over clients, zero outside each client's mask,
  and its vmapped rows equal single calls.
- ``grad``: ``jax.grad`` w.r.t. weights and client factors matches central finite differences
  in float64 (x64 is enabled for the check and restored afterwards).

Shapes (letters of ``docs/architecture.md``): ``C`` clients, ``R`` rank slots (``r_max``),
``N`` / ``M`` in / out features, ``...`` module batch dims (e.g. stacked layers). A case is
``global_lora[k] = LoraFactors(a [..., N, R], b [..., R, M], e [..., R] | None)``, the client
stack ``client_lora[k]`` with a leading ``C`` on every leaf, raw ``weights [C]`` and prefix
``masks[k] [C, ..., R]`` in {0, 1}, ``extras = {"scores": {k: [C, ..., R]}}`` or ``None``.

Tolerances default to the library's float32 tolerances (``2e-5``; ``1e-6`` for masked slots;
exact for zero weights and ``distribute``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import lora
from fedlora_jax.aggregation.base import PART_TOKENS, Aggregator
from fedlora_jax.lora import LoraFactors

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_SHAPES",
    "Case",
    "assert_trees_close",
    "check_aggregator",
    "check_all_zero_weights_keep_global",
    "check_contract",
    "check_distribute",
    "check_grad_matches_finite_differences",
    "check_identical_clients",
    "check_jit_matches_eager",
    "check_masked_slots_do_not_leak",
    "check_permutation_invariance",
    "check_shapes_and_dtypes",
    "check_vmap_over_rounds",
    "check_weight_scale_invariance",
    "check_zero_weight_clients",
    "default_ranks",
    "float64_enabled",
    "make_case",
]

#: module name -> ``(*lead, N, M)``; one module has a leading layer axis of 2.
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"layer.0.query": (9, 7), "stack.ffn": (2, 5, 8)}

#: Names accepted by ``check_aggregator(checks=..., skip=...)``, in the order they run.
ALL_CHECKS = ("contract", "shapes_and_dtypes", "masked_slots", "permutation", "weight_scale", "zero_weight",
              "all_zero_weights", "identical_clients", "jit", "vmap", "distribute", "grad")

_ATOL = 2e-5


class Case(NamedTuple):
    """One aggregation input: ``agg.aggregate(global_lora, client_lora, weights, masks, state, extras=extras)``.

    Attributes:
      global_lora: ``{k: LoraFactors(a [..., N, R], b [..., R, M], e [..., R] | None)}``.
      client_lora: the same with a leading ``C`` on every leaf.
      weights: ``[C]`` float32 raw weights in [1, 5).
      masks: ``{k: [C, ..., R]}`` float32 prefix masks.
      extras: ``{"scores": {k: [C, ..., R]}}`` float32 (zero on masked slots) or ``None``.
    """

    global_lora: dict[str, LoraFactors]
    client_lora: dict[str, LoraFactors]
    weights: jax.Array
    masks: dict[str, jax.Array]
    extras: dict[str, Any] | None


def default_ranks(num_clients: int = 4, r_max: int = 4) -> tuple[int, ...]:
    """Heterogeneous client ranks in ``[1, r_max]``; ``(2, 4, 3, 4)`` for 4 clients of rank 4."""
    if num_clients == 4 and r_max == 4:
        return (2, 4, 3, 4)
    return tuple(int(r) for r in 1 + (np.arange(num_clients) * 3 + 1) % r_max)


def _split_shape(shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"module shape must be (*lead, N, M), got {shape}")
    return shape[:-2], shape[-2], shape[-1]


def _prefix_masks(ranks: Sequence[int], lead: tuple[int, ...], r: int) -> np.ndarray:
    m = (np.arange(r)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)  # [C, R]
    m = m.reshape((len(ranks),) + (1,) * len(lead) + (r,))
    return np.array(np.broadcast_to(m, (len(ranks),) + lead + (r,)))


def make_case(seed: int = 0, *, ranks: Sequence[int] | None = None, num_clients: int = 4, r_max: int = 4,
              shapes: Mapping[str, Sequence[int]] | None = None, with_e: bool = False,
              extras: str | None = "scores", dtype: Any = jnp.float32, garbage: float = 0.0, nan: bool = False,
              identical: bool = False) -> Case:
    """A random aggregation :class:`Case`.

    Args:
      seed: NumPy seed of the draws (the masked-slot garbage uses ``seed + 1000``).
      ranks: active slots per client ``[C]`` (prefix masks); default :func:`default_ranks`.
      num_clients: ``C`` when ``ranks`` is not given.
      r_max: ``R``, the rank slots of every module.
      shapes: ``{module: (*lead, N, M)}``; default :data:`DEFAULT_SHAPES`.
      with_e: add the middle vector ``e [..., R]`` (positive, as FlexLoRA-sqrt / FedARA use).
      extras: ``"scores"`` (per-slot importance scores) or ``None``.
      dtype: dtype of the factors (masks, scores and weights stay float32).
      garbage: when nonzero, masked client slots hold random values of this size (not zeros).
      nan: masked client slots hold NaN.
      identical: every client holds client 0's factors.
    """
    if extras not in ("scores", None):
        raise ValueError(f"extras must be 'scores' or None, got {extras!r}")
    ranks = default_ranks(num_clients, r_max) if ranks is None else tuple(int(r) for r in ranks)
    if any(not 0 <= r <= r_max for r in ranks):
        raise ValueError(f"ranks {ranks} must lie in [0, r_max={r_max}]")
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    junk = np.random.default_rng(seed + 1000)
    c, r = len(ranks), r_max
    glob, clients, masks, scores = {}, {}, {}, {}
    for k, shape in shapes.items():
        lead, n, m = _split_shape(shape)
        ga = rng.normal(size=lead + (n, r))
        gb = rng.normal(size=lead + (r, m))
        ge = rng.uniform(0.5, 1.5, size=lead + (r,)) if with_e else None
        ca = rng.normal(size=(c,) + lead + (n, r))
        cb = rng.normal(size=(c,) + lead + (r, m))
        ce = rng.uniform(0.5, 1.5, size=(c,) + lead + (r,)) if with_e else None
        if identical:
            ca[:] = ca[:1]
            cb[:] = cb[:1]
            if with_e:
                ce[:] = ce[:1]
        mk = _prefix_masks(ranks, lead, r)
        if garbage or nan:
            fill = (lambda s: np.full(s, np.nan)) if nan else (lambda s: garbage * junk.normal(size=s))
            ca = np.where(mk[..., None, :] > 0, ca, fill(ca.shape))
            cb = np.where(mk[..., :, None] > 0, cb, fill(cb.shape))
            if with_e:
                ce = np.where(mk > 0, ce, fill(ce.shape))
        else:
            ca = ca * mk[..., None, :]
            cb = cb * mk[..., :, None]
            if with_e:
                ce = ce * mk
        cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
        glob[k] = LoraFactors(cast(ga), cast(gb), cast(ge))
        clients[k] = LoraFactors(cast(ca), cast(cb), cast(ce))
        masks[k] = jnp.asarray(mk)
        scores[k] = jnp.asarray(rng.uniform(0.1, 1.0, size=mk.shape) * mk, jnp.float32)
    weights = jnp.asarray(rng.uniform(1.0, 5.0, size=c), jnp.float32)
    return Case(glob, clients, weights, masks, {"scores": scores} if extras == "scores" else None)


# ---------------------------------------------------------------- comparison


def _fail(prop: str, msg: str) -> AssertionError:
    return AssertionError(f"[{prop}] {msg}")


def assert_trees_close(got: Any, want: Any, *, atol: float = _ATOL, rtol: float = _ATOL, prop: str = "trees",
                       names: Sequence[str] | None = None) -> None:
    """``|got - want| <= atol + rtol |want|`` leaf by leaf (NaN == NaN), same structure and shapes.

    Raises ``AssertionError`` ``"[prop] <leaf path>: ..."`` with the worst index and values;
    ``names`` label the top-level tuple entries (default ``("new_global", "state")`` for pairs).
    """
    lx, tx = jax.tree_util.tree_flatten_with_path(got)
    ly, ty = jax.tree_util.tree_flatten_with_path(want)
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise _fail(prop, f"tree structures differ: {jax.tree.structure(got)} vs {jax.tree.structure(want)}")
    if names is None and isinstance(got, tuple) and len(got) == 2:
        names = ("new_global", "state")
    del tx, ty
    for (path, u), (_, v) in zip(lx, ly, strict=True):
        where = _path_str(path, names)
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.shape != v.shape:
            raise _fail(prop, f"{where}: shape {u.shape} != expected {v.shape}")
        ok = np.isclose(u, v, atol=atol, rtol=rtol, equal_nan=True)
        if not np.all(ok):
            err = np.where(ok, -np.inf, np.nan_to_num(np.abs(u - v), nan=np.inf))
            idx = np.unravel_index(int(np.argmax(err)), u.shape) if u.shape else ()
            idx = tuple(int(i) for i in idx)
            raise _fail(prop, f"{where}: {int(np.sum(~ok))}/{u.size} entries differ (atol={atol}, rtol={rtol}); "
                              f"worst at index {idx}{_slot(path, idx)}: got {float(u[idx])!r}, "
                              f"expected {float(v[idx])!r}")


def _slot(path, idx) -> str:
    """``" (rank slot r)"`` for a factor leaf: last axis of ``a`` / ``e``, second-to-last of ``b``."""
    last = path[-1] if path else None
    name = getattr(last, "name", None)
    if name in ("a", "e") and idx:
        return f" (rank slot {idx[-1]})"
    if name == "b" and len(idx) >= 2:
        return f" (rank slot {idx[-2]})"
    return ""


def _path_str(path, names) -> str:
    if names and path and isinstance(path[0], jax.tree_util.SequenceKey) and path[0].idx < len(names):
        return names[path[0].idx] + jax.tree_util.keystr(path[1:])
    return "output" + jax.tree_util.keystr(path)


def _run(agg: Aggregator, case: Case, state: Any = None):
    glob, clients, w, masks, extras = case
    state = agg.init(glob) if state is None else state
    return agg.aggregate(glob, clients, w, masks, state, extras=extras)


def _case_kw(kw: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"ranks", "num_clients", "r_max", "shapes", "with_e", "extras", "dtype"}
    bad = set(kw) - allowed
    if bad:
        raise TypeError(f"unknown case options {sorted(bad)}; expected some of {sorted(allowed)}")
    return dict(kw)


# ---------------------------------------------------------------- the checks


def check_contract(agg: Aggregator, *, name: str | None = None) -> None:
    """``agg`` is an :class:`Aggregator` (named ``name`` if given) with valid, non-empty parts."""
    if not isinstance(agg, Aggregator):
        raise _fail("contract", f"expected a fedlora_jax.aggregation.Aggregator, got {type(agg).__name__}")
    if name is not None and agg.name != name:
        raise _fail("contract", f"name {agg.name!r} != {name!r}")
    for what in ("uplink_parts", "downlink_parts"):
        parts = getattr(agg, what)
        if not parts or not set(parts) <= set(PART_TOKENS):
            raise _fail("contract", f"{what}={parts!r} must be a non-empty tuple of {PART_TOKENS}")


def check_shapes_and_dtypes(agg: Aggregator, *, dtypes: Iterable[Any] = (jnp.float32, jnp.bfloat16), seed: int = 0,
                            **case_kw) -> None:
    """Outputs keep every leaf's shape ``[..., N, R]`` / ``[..., R, M]`` / ``[..., R]`` and dtype, are
    finite, keep ``e is None``; a ``state.base_delta[k]`` is ``[..., N, M]`` float32."""
    for dtype in dtypes:
        case = make_case(seed, dtype=dtype, **_case_kw(case_kw))
        new, state = _run(agg, case)
        if set(new) != set(case.global_lora):
            raise _fail("shapes_and_dtypes", f"new_global keys {sorted(new)} != {sorted(case.global_lora)}")
        for k, g in case.global_lora.items():
            for part in ("a", "b", "e"):
                x, y = getattr(g, part), getattr(new[k], part)
                where = f"new_global[{k!r}].{part} ({jnp.dtype(dtype).name} case)"
                if x is None:
                    if y is not None:
                        raise _fail("shapes_and_dtypes", f"{where}: expected None, got shape {np.shape(y)}")
                    continue
                if y is None or y.shape != x.shape or y.dtype != x.dtype:
                    got = None if y is None else (y.shape, y.dtype)
                    raise _fail("shapes_and_dtypes", f"{where}: got {got}, expected {(x.shape, x.dtype)}")
                bad = ~np.isfinite(np.asarray(y, np.float32))
                if np.any(bad):
                    idx = tuple(int(i) for i in np.argwhere(bad)[0])
                    raise _fail("shapes_and_dtypes", f"{where}: non-finite at index {idx}")
        if hasattr(state, "base_delta"):
            for k, g in case.global_lora.items():
                d, want = state.base_delta[k], g.a.shape[:-1] + g.b.shape[-1:]
                if d.shape != want or d.dtype != jnp.float32:
                    raise _fail("shapes_and_dtypes", f"state.base_delta[{k!r}]: got {(d.shape, d.dtype)}, "
                                                     f"expected {(want, jnp.dtype(jnp.float32))}")


def check_masked_slots_do_not_leak(agg: Aggregator, *, fills: Iterable[str] = ("garbage", "nan"), garbage: float = 1e3,
                                   atol: float = 1e-6, rtol: float = 1e-6, seed: int = 0, **case_kw) -> None:
    """Clients whose masked slots hold ``garbage``-sized noise (``"garbage"``) or NaN (``"nan"``)
    aggregate exactly as clients with zeros there."""
    kw = _case_kw(case_kw)
    clean = _run(agg, make_case(seed, **kw))
    for fill in fills:
        if fill not in ("garbage", "nan"):
            raise ValueError(f"fills entries must be 'garbage' or 'nan', got {fill!r}")
        dirty = _run(agg, make_case(seed, garbage=garbage, nan=fill == "nan", **kw))
        assert_trees_close(dirty, clean, atol=atol, rtol=rtol, prop=f"masked_slots ({fill} in masked slots)")


def check_permutation_invariance(agg: Aggregator, *, perm: Sequence[int] | None = None, atol: float = _ATOL,
                                 rtol: float = _ATOL, seed: int = 0, **case_kw) -> None:
    """Permuting clients (factors, weights, masks, extras by the same ``perm [C]``) changes nothing.
    ``perm`` defaults to a seeded random non-identity permutation."""
    case = make_case(seed, **_case_kw(case_kw))
    c = case.weights.shape[0]
    if perm is None:
        perm = np.random.default_rng(seed).permutation(c)
        perm = np.roll(perm, 1) if np.all(perm == np.arange(c)) else perm
    perm = np.asarray(perm)
    take = lambda t: jax.tree.map(lambda x: x[perm], t)  # noqa: E731
    ref = _run(agg, case)
    got = _run(agg, Case(case.global_lora, take(case.client_lora), case.weights[perm], take(case.masks),
                         take(case.extras)))
    assert_trees_close(got, ref, atol=atol, rtol=rtol, prop=f"permutation (clients permuted by {perm.tolist()})")


def check_weight_scale_invariance(agg: Aggregator, *, scale: float = 7.0, atol: float = _ATOL, rtol: float = _ATOL,
                                  seed: int = 0, **case_kw) -> None:
    """Raw weights ``scale * w`` aggregate as ``w`` (weights are normalised inside)."""
    case = make_case(seed, **_case_kw(case_kw))
    got = _run(agg, case._replace(weights=scale * case.weights))
    assert_trees_close(got, _run(agg, case), atol=atol, rtol=rtol, prop=f"weight_scale (weights x {scale})")


def check_zero_weight_clients(agg: Aggregator, *, atol: float = _ATOL, rtol: float = _ATOL, seed: int = 0,
                              **case_kw) -> None:
    """Appending a dropped client (weight 0, every entry of its factors and extras NaN, full mask)
    changes nothing."""
    case = make_case(seed, **_case_kw(case_kw))
    nan_one = lambda x: jnp.full_like(x[:1], jnp.nan)  # noqa: E731
    cat = lambda t, f: jax.tree.map(lambda x: jnp.concatenate([x, f(x)]), t)  # noqa: E731
    ext = Case(case.global_lora, cat(case.client_lora, nan_one),
               jnp.concatenate([case.weights, jnp.zeros((1,), case.weights.dtype)]),
               cat(case.masks, lambda x: jnp.ones_like(x[:1])), cat(case.extras, nan_one))
    assert_trees_close(_run(agg, ext), _run(agg, case), atol=atol, rtol=rtol,
                       prop="zero_weight (an extra all-NaN client of weight 0)")


def check_all_zero_weights_keep_global(agg: Aggregator, *, seed: int = 0, **case_kw) -> None:
    """All-zero weights return the previous global and the initial state exactly."""
    case = make_case(seed, **_case_kw(case_kw))
    state0 = agg.init(case.global_lora)
    got = _run(agg, case._replace(weights=jnp.zeros_like(case.weights)), state0)
    assert_trees_close(got, (case.global_lora, state0), atol=0, rtol=0, prop="all_zero_weights")


def check_identical_clients(agg: Aggregator, *, scale: float = 1.0, shared_a: bool | None = None,
                            rank: int | None = None, atol: float = _ATOL, rtol: float = _ATOL, seed: int = 0,
                            **case_kw) -> None:
    """Identical clients (all of rank ``rank``, default ``r_max - 1``) give back that client's update.

    The effective update of client 0 after the round, ``delta(distribute(new, mask, state,
    client_lora=client)) [..., N, M]`` plus any growth of ``state.base_delta``, must equal
    ``delta(client)``. ``scale`` is the LoRA scale the aggregator folds into ``base_delta``
    (FLoRA / FedEx ``scale=``). ``shared_a``: clients train only ``b`` on the global ``a``
    (FFA-LoRA); ``None`` infers it from ``"a"`` missing in ``uplink_parts``.
    """
    kw = _case_kw(case_kw)
    r_max = kw.get("r_max", 4)
    c = len(kw.pop("ranks")) if "ranks" in kw else kw.get("num_clients", 4)
    kw.pop("num_clients", None)
    rank = max(1, r_max - 1) if rank is None else rank
    glob, clients, w, masks, extras = make_case(seed, ranks=(rank,) * c, identical=True, **kw)
    if shared_a is None:
        shared_a = not {"a", "stack", "dense"} & set(agg.uplink_parts)
    if shared_a:
        clients = {k: LoraFactors(jnp.broadcast_to(glob[k].a, f.a.shape), f.b, f.e) for k, f in clients.items()}
        clients = lora.apply_masks(clients, masks)
    state0 = agg.init(glob)
    new, state = agg.aggregate(glob, clients, w, masks, state0, extras=extras)
    one = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    start = agg.distribute(new, one(masks), state, client_lora=one(clients))
    got, want = {}, {}
    for k, f in start.items():
        d = lora.delta(f, one(masks)[k], scale=scale)
        if hasattr(state, "base_delta"):
            d = d + state.base_delta[k] - state0.base_delta[k]
        got[k] = d
        want[k] = lora.delta(one(clients)[k], one(masks)[k], scale=scale)
    assert_trees_close(got, want, atol=atol, rtol=rtol, prop="identical_clients (effective delta of client 0)",
                       names=())


def check_jit_matches_eager(agg: Aggregator, *, atol: float = _ATOL, rtol: float = _ATOL, seed: int = 0,
                            **case_kw) -> None:
    """``jax.jit(aggregate)`` gives the eager result."""
    glob, clients, w, masks, extras = make_case(seed, **_case_kw(case_kw))
    state = agg.init(glob)
    eager = agg.aggregate(glob, clients, w, masks, state, extras=extras)
    jitted = jax.jit(lambda *a: agg.aggregate(*a, extras=extras))(glob, clients, w, masks, state)
    assert_trees_close(jitted, eager, atol=atol, rtol=rtol, prop="jit (jax.jit(aggregate) vs eager)")


def check_vmap_over_rounds(agg: Aggregator, *, seeds: Sequence[int] = (1, 2), atol: float = _ATOL,
                           rtol: float = _ATOL, **case_kw) -> None:
    """``jax.vmap(aggregate)`` over a stack of independent rounds equals a loop over them."""
    cases = [make_case(s, **_case_kw(case_kw)) for s in seeds]
    states = [agg.init(c.global_lora) for c in cases]
    loop = [_run(agg, c, s) for c, s in zip(cases, states, strict=True)]
    stack = lambda xs: jax.tree.map(lambda *v: jnp.stack(v), *xs)  # noqa: E731
    args = stack([tuple(c[:4]) + (s, c.extras) for c, s in zip(cases, states, strict=True)])
    got = jax.vmap(lambda g, c, w, m, s, x: agg.aggregate(g, c, w, m, s, extras=x))(*args)
    assert_trees_close(got, stack(loop), atol=atol, rtol=rtol, prop="vmap (vmap over rounds vs a loop)")


def check_distribute(agg: Aggregator, *, client: int = 1, seed: int = 0, **case_kw) -> None:
    """``distribute(new, masks[i], state, client_lora=clients[i])`` vmaps over clients, returns the
    client shapes ``a [C, ..., N, R]``, ``b [C, ..., R, M]`` in the global dtype, exact zeros outside
    each client's mask, and row ``client`` equals the single call exactly."""
    case = make_case(seed, **_case_kw(case_kw))
    new, state = _run(agg, case)
    masks, clients = case.masks, case.client_lora
    out = jax.vmap(lambda m, c: agg.distribute(new, m, state, client_lora=c))(masks, clients)
    pick = lambda t: jax.tree.map(lambda x: x[client], t)  # noqa: E731
    single = agg.distribute(new, pick(masks), state, client_lora=pick(clients))
    for k, f in out.items():
        m = np.asarray(masks[k])
        if f.a.shape != clients[k].a.shape or f.a.dtype != case.global_lora[k].a.dtype:
            raise _fail("distribute", f"[{k!r}].a: got {(f.a.shape, f.a.dtype)}, expected "
                                      f"{(clients[k].a.shape, case.global_lora[k].a.dtype)}")
        if f.b.shape != clients[k].b.shape:
            raise _fail("distribute", f"[{k!r}].b: got shape {f.b.shape}, expected {clients[k].b.shape}")
        for part, off in (("a", np.broadcast_to(m[..., None, :] == 0, f.a.shape)),
                          ("b", np.broadcast_to(m[..., :, None] == 0, f.b.shape))):
            x = np.asarray(getattr(f, part))
            leak = off & (x != 0)
            if np.any(leak):
                idx = tuple(int(i) for i in np.argwhere(leak)[0])
                raise _fail("distribute", f"[{k!r}].{part}: nonzero outside the client's mask at [client, ...] "
                                          f"index {idx}")
        assert_trees_close(pick(out[k]), single[k], atol=0, rtol=0,
                           prop=f"distribute (vmapped row {client} vs single call, module {k!r})", names=())


@contextlib.contextmanager
def float64_enabled():
    """Context manager: ``jax_enable_x64`` on inside, the previous setting restored on exit."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def check_grad_matches_finite_differences(agg: Aggregator, *, seed: int = 3, h: float = 1e-5, rtol: float = 1e-5,
                                          atol: float = 1e-7, **case_kw) -> None:
    """In float64: ``jax.grad`` of a generic scalar of the outputs w.r.t. ``(weights [C], client a,
    client b)`` is finite and its directional derivative along a random direction matches central
    differences (step ``h``), for all arguments together and for the weights alone."""
    kw = _case_kw(case_kw)
    kw.pop("dtype", None)
    with float64_enabled():
        glob, clients, w, masks, extras = make_case(seed, dtype=jnp.float64, **kw)
        keys = tuple(glob)
        state = agg.init(glob)
        w = w.astype(jnp.float64)
        rng = np.random.default_rng(11)
        coef = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                            agg.aggregate(glob, clients, w, masks, state, extras=extras))

        def loss(w, a, b):
            cl = {k: LoraFactors(a[k], b[k], clients[k].e) for k in keys}
            out = agg.aggregate(glob, cl, w, masks, state, extras=extras)
            return sum(jax.tree.leaves(jax.tree.map(lambda x, c: jnp.sum(jnp.sin(c * x)), out, coef)))

        x0 = (w, {k: clients[k].a for k in keys}, {k: clients[k].b for k in keys})
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*x0)
        loss = jax.jit(loss)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
            if not np.all(np.isfinite(np.asarray(leaf))):
                where = ("d/dweights", "d/dclient_a", "d/dclient_b")[path[0].idx] + jax.tree_util.keystr(path[1:])
                raise _fail("grad", f"{where}: non-finite gradient")
        rng = np.random.default_rng(5)
        v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), x0)
        zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        for what, d in (("weights and client factors", v), ("weights alone", (v[0], zero(v[1]), zero(v[2])))):
            plus = jax.tree.map(lambda x, e: x + h * e, x0, d)
            minus = jax.tree.map(lambda x, e: x - h * e, x0, d)
            fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * h)
            an = sum(float(jnp.vdot(g, e)) for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True))
            if not np.isclose(an, fd, rtol=rtol, atol=atol):
                raise _fail("grad", f"directional derivative along {what}: jax.grad gives {an!r}, central "
                                    f"differences give {fd!r} (rtol={rtol}, atol={atol})")


# ---------------------------------------------------------------- the battery

_CHECKS = {
    "shapes_and_dtypes": check_shapes_and_dtypes,
    "masked_slots": check_masked_slots_do_not_leak,
    "permutation": check_permutation_invariance,
    "weight_scale": check_weight_scale_invariance,
    "zero_weight": check_zero_weight_clients,
    "all_zero_weights": check_all_zero_weights_keep_global,
    "identical_clients": check_identical_clients,
    "jit": check_jit_matches_eager,
    "vmap": check_vmap_over_rounds,
    "distribute": check_distribute,
    "grad": check_grad_matches_finite_differences,
}


def check_aggregator(agg: Aggregator, *, num_clients: int = 4, r_max: int = 4,
                     shapes: Mapping[str, Sequence[int]] | None = None, ranks: Sequence[int] | None = None,
                     with_e: bool = False, extras: str | None = "scores", dtype: Any = jnp.float32,
                     checks: Iterable[str] = ALL_CHECKS, skip: Iterable[str] = (), grad: bool = True,
                     scale: float = 1.0, shared_a: bool | None = None, seed: int = 0) -> None:
    """Run the conformance battery on ``agg``; ``None`` if every property holds.

    Args:
      agg: the aggregator under test.
      num_clients: ``C`` (ignored when ``ranks`` is given).
      r_max: ``R``, rank slots of every module.
      shapes: ``{module: (*lead, N, M)}``; default :data:`DEFAULT_SHAPES` (one with a layer axis).
      ranks: active slots per client ``[C]``; default :func:`default_ranks` (heterogeneous).
      with_e: the factors carry the middle vector ``e [..., R]``.
      extras: ``"scores"`` passes ``extras={"scores": {k: [C, ..., R]}}`` (FedARA / HAFL style);
        ``None`` passes ``extras=None``.
      dtype: factor dtype of the cases (``shapes_and_dtypes`` also tries bfloat16; ``grad``
        always runs in float64).
      checks: names of :data:`ALL_CHECKS` to run.
      skip: names to leave out, for properties a method legitimately lacks (document why in
        your test), e.g. ``skip=("grad",)`` for a piecewise-constant rule.
      grad: ``False`` is the same as skipping ``"grad"`` (the slowest check).
      scale: LoRA scale the aggregator folds into ``state.base_delta`` (``identical_clients``).
      shared_a: see :func:`check_identical_clients`.
      seed: seed of the random cases.

    Raises:
      AssertionError: ``"[property] <where>: <what>"`` for the first failed property.
      ValueError: an unknown check name.
    """
    checks, skip = tuple(checks), set(skip)
    unknown = (set(checks) | skip) - set(ALL_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; expected names of {ALL_CHECKS}")
    if not grad:
        skip.add("grad")
    kw = {"r_max": r_max, "shapes": shapes, "with_e": with_e, "extras": extras, "dtype": dtype}
    kw.update({"ranks": ranks} if ranks is not None else {"num_clients": num_clients})
    for name in ALL_CHECKS:
        if name not in checks or name in skip:
            continue
        if name == "contract":
            check_contract(agg)
        elif name == "shapes_and_dtypes":
            check_shapes_and_dtypes(agg, dtypes=tuple(dict.fromkeys((dtype, jnp.bfloat16))), seed=seed,
                                    **{k: v for k, v in kw.items() if k != "dtype"})
        elif name == "identical_clients":
            check_identical_clients(agg, scale=scale, shared_a=shared_a, seed=seed, **kw)
        elif name == "vmap":
            check_vmap_over_rounds(agg, seeds=(seed + 1, seed + 2), **kw)
        elif name == "grad":
            check_grad_matches_finite_differences(agg, seed=seed + 3, **kw)
        else:
            _CHECKS[name](agg, seed=seed, **kw)
