"""A Flower (``flwr``) deployment of any federated LoRA method of the library.

The simulator's round (:func:`fedlora_jax.federated.make_round`) vmaps ONE function over the
clients, :func:`~fedlora_jax.federated.client_update`; here each Flower ClientApp runs that
same function, jitted, on its own data, and the ServerApp strategy runs the rest of the
round with the simulator's own server half (:mod:`fedlora_jax.federated.server`: distribute,
screen, aggregate, per-client state, server update). Nothing branches on a method's name:
what travels is read from the aggregator's ``uplink_parts`` / ``downlink_parts``.

One round::

    server  plan(state, client_ids, round) -> masks; make_spec -> grad_cut
            starts = distribute_clients(algorithm, state, masks, own)
            downlink: the factors of downlink_parts over the forward masks, the head, the
                      base update if the aggregator folds one (dense; FLoRA: the stacked
                      factors of the rounds the client lacks), the masks, round, client id,
                      grad cut
    client  start = payload re-padded onto its last adapter (the round-0 adapter before it
                    trained, or when no factor is sent: FLoRA restarts)
            client_update(task, optimizer, options, start, base_eff, batches, spec, key), timed
            uplink: the factors of uplink_parts over the update masks, the head, the scores
                    (importance methods) over the forward masks, example count, loss, seconds
    server  check_reply (a bad reply is left out and reported); re-pad onto start_c;
            server_round_update with weights = the examples the server assigned;
            algorithm.observe on the measured times (LEGEND)

Keys are the simulator's: client ``c`` of round ``r`` uses ``fold_in(round_key(seed, r), c)``,
so with the same data a Flower round equals the simulated round to float tolerance
(``tests/deploy/test_flower.py``). A client that does not answer within the round timeout
(or whose node died) is left out of that round's aggregation.

Needs ``pip install fedlora_jax[flower]`` (``flwr``). Serialization: numpy arrays in Flower
``ArrayRecord`` s (``np.save`` format, ``allow_pickle=False``), never pickle.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedlora_jax import devices as dev_lib
from fedlora_jax import lora as lora_lib
from fedlora_jax.algorithms.base import Algorithm, RoundReport
from fedlora_jax.deploy import payload as pl
from fedlora_jax.federated import server as srv
from fedlora_jax.federated.round import ClientOutput, Task, client_update, init_server_state, round_key
from fedlora_jax.federated.server import check_hyper, effective_base
from fedlora_jax.federated.spec import ClientSpec, ServerHyper, ServerState, make_spec

CACHE_KEY = "fedlora-last-adapter"


class Deployment(NamedTuple):
    """Everything both sides of a deployment are built from (the same on server and clients).

    Attributes:
      task: the model's :class:`~fedlora_jax.federated.Task`.
      algorithm: an :class:`~fedlora_jax.algorithms.Algorithm` with a ``plan``.
      optimizer: the clients' inner optax optimizer (fresh state every round).
      lora: round-0 global adapter ``{key: LoraFactors}`` (also a client's fill for factors
        it is not sent before it has trained once).
      head: round-0 head pytree.
      base: frozen base parameters (used by clients only).
      client_data: ``client_data(client_id, round) -> batches`` (leaves ``[S, B, ...]``), the
        client's local data of that round.
      num_clients: population ``K`` (client ids ``0..K-1`` = Flower partition ids).
      num_layers: ``L``. layer_of_key: ``{key: layer}`` (spec defaults: grad cut, depth).
      seed: experiment seed (round keys).
      drop_nonfinite: a client whose result has NaN/inf gets weight 0 (as the simulator); such
        a client keeps its previous local adapter.
      num_examples: ``num_examples(client_id, round) -> int``, the examples the server
        assigned that client for that round (its partition): the client's aggregation weight,
        and a reply claiming another number is dropped. ``None``: every client weighs 1 and
        the claim is not checked.
      hyper: server hyperparameters as arrays (:class:`~fedlora_jax.federated.ServerHyper`:
        server learning rate, the aggregator's ``extras["hyper"]``), as ``round_fn(...,
        hyper=...)`` takes them.
      model_shape, batch_size, client_devices: for an algorithm that learns from the
        devices' reports (``Algorithm.observe``, LEGEND): the cost model's
        :class:`~fedlora_jax.devices.ModelShape` and batch size (the FLOPs a client did) and
        each client's device type ``[K]`` int.
    """

    task: Task
    algorithm: Algorithm
    optimizer: optax.GradientTransformation
    lora: Any
    head: Any
    base: Any
    client_data: Callable[[int, int], Any]
    num_clients: int
    num_layers: int
    layer_of_key: Mapping[str, int]
    seed: int = 0
    drop_nonfinite: bool = True
    num_examples: Callable[[int, int], float] | None = None
    hyper: ServerHyper | None = None
    model_shape: Any = None
    batch_size: int = 0
    client_devices: Any = None
    scale: float | None = None


class _Folded(NamedTuple):
    base_delta: Any


class ClientCache(NamedTuple):
    """What a client keeps between rounds (Flower's ``context.state``).

    Attributes:
      lora: its last trained adapter (``None`` before it trained): the fill for factors the
        server does not send (FedSA-LoRA's local ``b``, FFA-LoRA's frozen ``a``).
      base_delta: ``{key: [N, M]}`` the base update it has folded (FLoRA / FedEx-LoRA), or ``None``.
      base_round: the rounds whose stacked updates ``base_delta`` holds (FLoRA's stack downlink).
    """

    lora: Any = None
    base_delta: Any = None
    base_round: int = 0


def down_parts(aggregator, tree) -> tuple[str, ...]:
    """Factors sent to a client: those of ``downlink_parts``. None for FLoRA (downlink
    ``"stack"`` or ``"dense"``): its clients restart from the round-0 adapter they hold."""
    return pl.factor_parts(aggregator.downlink_parts, tree)


def restarts(aggregator, tree) -> bool:
    """Whether a client rebuilds its start from its round-0 adapter (the downlink names no
    factor: FLoRA folds every round into the base and restarts the adapter)."""
    return not down_parts(aggregator, tree)


def stacked_downlink(aggregator, agg_state) -> bool:
    """Whether the base update travels as the clients' stacked factors (``"stack"`` downlink of
    an aggregator that folds into the base and restarts the adapter: FLoRA), rather than dense."""
    return ("stack" in aggregator.downlink_parts and getattr(agg_state, "base_delta", None) is not None
            and not any(p in aggregator.downlink_parts for p in pl.FACTORS))


def up_parts(aggregator, tree) -> tuple[str, ...]:
    """Factors a client sends back: those of ``uplink_parts``."""
    return pl.factor_parts(aggregator.uplink_parts, tree)


def _np_tree(tree):
    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------- client side


class ClientTrainer:
    """One client's side of a round, without Flower types (the ClientApp wraps it).

    ``trainer(arrays, config, cache) -> (reply_arrays, reply_metrics, new_cache)``:
    ``arrays`` the downlink payload, ``config`` ``{"round", "client-id", "grad-cut"}``,
    ``cache`` the client's :class:`ClientCache` (or ``None``). A result with NaN/inf (which
    the server drops) leaves the cached adapter as it was.

    The base update (FLoRA / FedEx-LoRA) arrives dense (``base_delta/{key}``, replaces the
    client's) or, for FLoRA's stack downlink, as the stacked factors of the rounds the client
    has not folded yet (``stack/{t}/{key}/a`` ``[N, s]``, ``.../b`` ``[s, M]``, scale and
    weights inside ``a``), added to the ``base_delta`` it keeps.
    """

    def __init__(self, dep: Deployment):
        self.dep = dep
        algo = dep.algorithm

        def train(trainable, base, base_delta, batches, spec, key, round_idx):
            base_eff = effective_base(dep.task, base, _Folded(base_delta) if base_delta is not None else None)
            return client_update(dep.task, dep.optimizer, algo.client, trainable, base_eff, batches, spec, key,
                                 round_idx=round_idx)

        self._train = jax.jit(train)
        self._compiled: dict = {}

    def _run(self, *args):
        """The jitted training, compiled ahead (once per input signature), and its measured
        seconds (compilation not included)."""
        leaves, treedef = jax.tree.flatten(args)
        sig = (treedef, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else (repr(x),) for x in leaves))
        if sig not in self._compiled:
            self._compiled[sig] = self._train.lower(*args).compile()
        t0 = time.perf_counter()
        out = jax.device_get(self._compiled[sig](*args))
        return out, time.perf_counter() - t0

    def __call__(self, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], cache=None):
        dep = self.dep
        r, cid = int(config["round"]), int(config["client-id"])
        cache = ClientCache() if cache is None else cache
        aggregator = dep.algorithm.aggregator
        fill = dep.lora if cache.lora is None or restarts(aggregator, dep.lora) else cache.lora
        start, masks = pl.unpack_lora(arrays, _np_tree(fill), prefix="down")
        start = _np_tree(lora_lib.apply_masks(start, masks))  # what distribute returns: zeros off the mask
        update_masks = {k: (np.asarray(arrays[f"down/{k}/upmask"]) != 0).astype(np.float32) for k in masks}
        head = pl.unpack_tree(arrays, dep.head, prefix="head")
        base_delta, base_round = fold_downlink(arrays, cache, dep.lora, r)
        batches = dep.client_data(cid, r)
        steps = int(jax.tree.leaves(batches)[0].shape[0])
        spec = ClientSpec(masks=masks, update_masks=update_masks,
                          depth_mask=np.ones((dep.num_layers,), np.float32),
                          grad_cut=np.int32(config["grad-cut"]), num_steps=np.int32(steps),
                          weight=np.float32(1.0), client_id=np.int32(cid), device_id=np.int32(0))
        key = jax.random.fold_in(round_key(dep.seed, r), np.uint32(cid))
        out, compute_s = self._run({"lora": start, "head": head}, dep.base, base_delta, batches, spec, key,
                                   jnp.int32(r))
        reply = pl.pack_lora(out.lora, update_masks, up_parts(dep.algorithm.aggregator, out.lora), prefix="up")
        reply.update(pl.pack_tree(out.head, prefix="head"))
        if dep.algorithm.client.track_importance:
            reply.update(pl.pack_slots(out.scores, masks, prefix="scores"))
        metrics = {"client-id": cid, "num-examples": float(out.count), "loss": float(out.loss),
                   "correct": float(out.correct), "steps": float(out.steps_done), "compute-s": compute_s}
        finite = bool(srv.all_finite((out.lora, out.head))) and bool(np.isfinite(out.loss))
        keep = dep.drop_nonfinite and not finite  # the server drops this result: keep the last adapter
        return reply, metrics, ClientCache(cache.lora if keep else out.lora, base_delta, base_round)


def fold_downlink(arrays: Mapping[str, np.ndarray], cache: ClientCache, lora, round_idx: int):
    """The client's base update after this downlink: ``(base_delta or None, base_round)``.

    A dense ``base_delta/{key}`` replaces it; stacked factors of rounds ``t >= cache.base_round``
    are added (``a @ b``, float32), older ones (sent again after a lost reply) skipped."""
    if any(k.startswith("base_delta/") for k in arrays):
        return {k: np.asarray(arrays[f"base_delta/{k}"]) for k in lora}, round_idx
    rounds = sorted({int(k.split("/")[1]) for k in arrays if k.startswith("stack/")})
    if not rounds:
        return cache.base_delta, cache.base_round
    base = cache.base_delta
    if base is None:
        base = {k: np.zeros((f.a.shape[-2], f.b.shape[-1]), np.float32) for k, f in lora.items()}
    base = dict(base)
    for t in rounds:
        if t >= cache.base_round:
            for k in base:
                a, b = np.asarray(arrays[f"stack/{t}/{k}/a"]), np.asarray(arrays[f"stack/{t}/{k}/b"])
                base[k] = base[k] + (a.astype(np.float32) @ b.astype(np.float32)).astype(base[k].dtype)
    return base, max(round_idx, cache.base_round)


# ----------------------------------------------------------------------------- server side


class _Pending(NamedTuple):
    ids: np.ndarray
    spec: ClientSpec
    starts: Any
    own: Any
    examples: np.ndarray       # [C] examples each client was assigned this round (its weight)
    expected: list             # per client: the reply payload's expected layout (check_payload)
    bytes_down: np.ndarray     # [C] downlink payload bytes (numbers only, as round_bytes counts)


REPLY_METRICS = ("client-id", "num-examples", "loss", "correct", "steps", "compute-s")


def check_reply(arrays: Mapping[str, Any], metrics: Mapping[str, Any], expected: Mapping[str, np.ndarray],
                client_id: int, examples: float | None) -> str | None:
    """Why a client's reply must be dropped, or ``None`` when it can be aggregated.

    The payload must be exactly the expected one (:func:`~fedlora_jax.deploy.payload.check_payload`:
    size, names, masks within the slots the client was given, shapes, dtypes, finite values);
    the metrics must name this client, be finite, and claim exactly the ``examples`` the
    server assigned (the aggregation weight is the server's number, never the client's;
    ``None``: not checked).
    """
    reason = pl.check_payload(arrays, expected)
    if reason is not None:
        return reason
    missing = [m for m in REPLY_METRICS if m not in metrics]
    if missing:
        return f"metrics without {missing}"
    try:
        vals = {m: float(metrics[m]) for m in REPLY_METRICS}
    except (TypeError, ValueError):
        return "metrics that are not numbers"
    if not all(np.isfinite(v) for v in vals.values()):
        return "non-finite metrics"
    if vals["client-id"] != client_id:
        return f"metrics of client {vals['client-id']:g} in the reply of client {client_id}"
    if examples is not None and vals["num-examples"] != float(examples):
        return f"claims {vals['num-examples']:g} examples, the server assigned {float(examples):g}"
    if not 0 <= vals["correct"] <= vals["num-examples"] or vals["steps"] < 0 or vals["compute-s"] < 0:
        return "metrics out of range (correct, steps, compute-s)"
    return None


class FedLoraServer:
    """The server's side of a round, without Flower types (the strategy wraps it).

    ``configure(client_ids) -> {client_id: (arrays, config)}`` then
    ``aggregate({client_id: (arrays, metrics)}) -> metrics``; ``state`` is the
    :class:`~fedlora_jax.federated.ServerState` (the simulator's). Both halves are the
    functions of :mod:`fedlora_jax.federated.server` that the simulator's round calls.

    Every reply is checked (:func:`check_reply`) before it is aggregated; a refused one is
    left out of the round like a client that did not answer, and reported (``rejected``:
    ``{client_id: reason}`` of the last round, ``num_rejected`` in the metrics). A client's
    weight is the number of examples the server assigned it (``Deployment.num_examples``).
    """

    def __init__(self, dep: Deployment):
        self.dep = dep
        algo = dep.algorithm
        if algo.plan is None:
            raise ValueError(f"algorithm {algo.name!r} has no plan; a deployment needs one to make client masks")
        check_hyper(dep.hyper, algo.aggregator)
        self.state: ServerState = init_server_state(dep.lora, dep.head, algo, num_clients=dep.num_clients)
        self._pending: _Pending | None = None
        self.rejected: dict[int, str] = {}
        self._stacks: dict[int, dict] = {}                    # FLoRA: round t's stacked factors
        self._synced = np.zeros(dep.num_clients, np.int64)    # rounds each client has folded
        if stacked_downlink(algo.aggregator, self.state.agg_state) and dep.scale is None:
            raise ValueError(f"aggregator {algo.aggregator.name!r} sends the stacked factors: the Deployment "
                             "needs its LoRA scale (scale = lora_alpha / r_max)")
        self.report: RoundReport | None = None
        self.reports: list[RoundReport] = []  # what observe learnt from, one a round
        if algo.observe is not None and (dep.model_shape is None or dep.client_devices is None
                                         or dep.batch_size < 1):
            raise ValueError(f"algorithm {algo.name!r} learns from the devices' reports (observe): the "
                             "Deployment needs model_shape, batch_size >= 1 and client_devices")
        self._distribute = jax.jit(functools.partial(srv.distribute_clients, algo))
        self._update = jax.jit(functools.partial(srv.server_round_update, algo, drop_nonfinite=dep.drop_nonfinite))

    def configure(self, client_ids) -> dict[int, tuple[dict, dict]]:
        dep, state = self.dep, self.state
        ids = np.sort(np.asarray(client_ids, np.int32))
        r = int(state.round)
        plan = dep.algorithm.plan(state, ids, r)
        examples = np.asarray([1.0 if dep.num_examples is None else dep.num_examples(int(c), r) for c in ids],
                              np.float32)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, depth_mask=plan.depth_mask,
                         global_masks=plan.global_masks, num_steps=np.zeros(len(ids), np.int32),
                         weight=examples, client_id=ids, num_layers=dep.num_layers,
                         layer_of_key=dict(dep.layer_of_key))
        own = jax.device_get(srv.gather_clients(state.clients, ids)) if dep.algorithm.client_state else ()
        starts = jax.device_get(self._distribute(state, spec.masks, own))
        base_delta = getattr(state.agg_state, "base_delta", None)
        stacked = stacked_downlink(dep.algorithm.aggregator, state.agg_state)
        parts = down_parts(dep.algorithm.aggregator, state.lora)
        out, expected = {}, []
        for i, cid in enumerate(ids.tolist()):
            start = jax.tree.map(lambda x, i=i: x[i], starts)
            masks = {k: np.asarray(v[i]) for k, v in spec.masks.items()}
            up_masks = {k: np.asarray(v[i]) for k, v in spec.update_masks.items()}
            arrays = pl.pack_lora(start, masks, parts, prefix="down")
            arrays.update({f"down/{k}/upmask": np.asarray(v != 0, np.uint8) for k, v in up_masks.items()})
            arrays.update(pl.pack_tree(state.head, prefix="head"))
            if stacked:
                arrays.update(self._stack_since(int(self._synced[cid]), base_delta))
            elif base_delta is not None:
                arrays.update({f"base_delta/{k}": np.asarray(v) for k, v in base_delta.items()})
            out[cid] = (arrays, {"round": r, "client-id": cid, "grad-cut": int(spec.grad_cut[i])})
            expected.append(reply_layout(dep, start, masks, up_masks))
        bytes_down = np.asarray([pl.payload_bytes(a) for a, _ in out.values()], np.float64)
        self._pending = _Pending(ids, spec, starts, own, examples, expected, bytes_down)
        return out

    def expected_reply(self, client_id: int) -> tuple[dict[str, np.ndarray], float | None]:
        """What the server expects from ``client_id`` in the configured round: a payload of the
        reply's layout (masks = the update masks it was given) and the examples it was assigned
        (``None`` without ``Deployment.num_examples``): :func:`check_reply`'s arguments."""
        if self._pending is None:
            raise RuntimeError("expected_reply called before configure")
        return _expected(self._pending, self.dep, self._pending.ids.tolist().index(int(client_id)))

    def aggregate(self, replies: Mapping[int, tuple[Mapping[str, np.ndarray], Mapping[str, Any]]],
                  round_trip_s: Mapping[int, float] | None = None) -> dict:
        """Aggregate the clients whose replies pass :func:`check_reply` (the others, and those
        that did not answer, are left out of this round).

        ``round_trip_s``: per client, the seconds from sending its instruction to receiving
        its reply (measured by the strategy); with the client's measured ``compute-s`` it
        gives the transfer times an algorithm's ``observe`` learns from (LEGEND).
        """
        if self._pending is None:
            raise RuntimeError("aggregate called before configure")
        dep, p = self.dep, self._pending
        self._pending = None
        self.rejected = {}
        for cid in replies:  # it received the downlink, so it folded the base update up to now
            if cid in p.ids:
                self._synced[cid] = int(self.state.round)
        rows = []
        for i, cid in enumerate(p.ids.tolist()):
            if cid not in replies:
                continue
            arrays, metrics = replies[cid]
            expected, examples = _expected(p, dep, i)
            reason = check_reply(arrays, metrics, expected, cid, examples)
            if reason is None:
                rows.append(i)
            else:
                self.rejected[cid] = reason
        report = {"num_clients": len(rows), "num_rejected": len(self.rejected)}
        self._observe(p, rows, replies, round_trip_s or {})
        if not rows:
            self.state = self.state._replace(algo=self._observed(self.state.algo))
            return report
        take = lambda tree: jax.tree.map(lambda x: np.asarray(x)[np.asarray(rows)], tree)
        spec, starts, own = take(p.spec), take(p.starts), take(p.own)
        loras, heads, scores, cols = [], [], [], {m: [] for m in ("loss", "correct", "num-examples", "steps")}
        for j, i in enumerate(rows):
            arrays, metrics = replies[int(p.ids[i])]
            start = jax.tree.map(lambda x, j=j: x[j], starts)
            lora, _ = pl.unpack_lora(arrays, start, prefix="up")
            loras.append(lora)
            heads.append(pl.unpack_tree(arrays, dep.head, prefix="head"))
            if dep.algorithm.client.track_importance:
                fwd = {k: v[j] for k, v in spec.masks.items()}
                scores.append(pl.unpack_slots(arrays, fwd, prefix="scores"))
            for m in cols:
                cols[m].append(float(metrics[m]))
        stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
        outs = ClientOutput(stack(loras), stack(heads), stack(scores) if scores else {},
                            np.asarray(cols["loss"], np.float32), np.asarray(cols["correct"], np.float32),
                            np.asarray(cols["num-examples"], np.float32), np.asarray(cols["steps"], np.float32))
        spec = spec._replace(global_masks=None)
        update = self._update(self.state, outs, starts, spec, own, hyper=dep.hyper)
        if stacked_downlink(dep.algorithm.aggregator, self.state.agg_state):
            self._stacks[int(self.state.round)] = self._stack_of(update, spec, self.state.agg_state.base_delta)
            self._prune_stacks(update.state.agg_state.base_delta)
        self.state = update.state._replace(algo=self._observed(update.state.algo))
        metrics = jax.device_get({k: update.metrics[k] for k in srv.SCALAR_METRICS})
        return {**{k: float(v) for k, v in metrics.items()}, **report}

    def _stack_of(self, update, spec, old_delta) -> dict[str, np.ndarray]:
        """FLoRA's downlink of this round: per module the stacked factors of the clients that
        counted, ``a_j diag(scale p_j m_j e_j)`` ``[N, s]`` and ``b_j`` ``[s, M]`` over their
        update slots, whose product is exactly the aggregator's base update (checked)."""
        scr = jax.device_get(update.screened)
        w = np.asarray(scr.weights, np.float64)
        p = w / w.sum() if w.sum() > 0 else np.zeros_like(w)
        t = int(self.state.round)
        new_delta = jax.device_get(update.state.agg_state.base_delta)
        out = {}
        for k, f in scr.lora.items():
            cols_a, rows_b = [], []
            for j in np.flatnonzero(p > 0):
                m = np.asarray(spec.update_masks[k][j]) != 0
                gain = self.dep.scale * p[j] * (np.ones(m.sum()) if f.e is None else np.asarray(f.e[j])[m])
                cols_a.append(np.asarray(f.a[j])[:, m] * gain.astype(np.float32))
                rows_b.append(np.asarray(f.b[j])[m])
            n, mm = f.a.shape[-2], f.b.shape[-1]
            a = np.concatenate(cols_a, axis=1) if cols_a else np.zeros((n, 0), np.float32)
            b = np.concatenate(rows_b, axis=0) if rows_b else np.zeros((0, mm), np.float32)
            want = np.asarray(new_delta[k], np.float64) - np.asarray(old_delta[k], np.float64)
            got = a.astype(np.float64) @ b.astype(np.float64)
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0)))):
                raise RuntimeError(f"module {k!r}: the stacked factors do not give the aggregator's base update "
                                   "(is Deployment.scale the run's LoRA scale?)")
            out[f"stack/{t}/{k}/a"], out[f"stack/{t}/{k}/b"] = a.astype(np.float32), b.astype(np.float32)
        return out

    def _stack_since(self, first: int, base_delta) -> dict[str, np.ndarray]:
        """The stacked factors of rounds ``first..now-1`` (one round's: what ``round_bytes``
        counts), or, for a client that missed rounds, the dense base update when that is smaller
        (or when those rounds' stacks were let go)."""
        now = int(self.state.round)
        dense = {f"base_delta/{k}": np.asarray(v) for k, v in base_delta.items()}
        if any(t not in self._stacks for t in range(first, now)):
            return dense
        out = {}
        for t in range(first, now):
            out.update(self._stacks[t])
        return out if now - first <= 1 or pl.payload_bytes(out) <= pl.payload_bytes(dense) else dense

    def _prune_stacks(self, base_delta) -> None:
        """Let go of the oldest round's stack once the newer ones alone outweigh the dense base
        update: a client that still needs it would get the dense update anyway."""
        dense = sum(np.asarray(v).nbytes for v in jax.tree.leaves(base_delta))
        while len(self._stacks) > 1:
            oldest = min(self._stacks)
            if sum(pl.payload_bytes(v) for t, v in self._stacks.items() if t != oldest) < dense:
                break
            del self._stacks[oldest]

    def _observe(self, p: _Pending, rows, replies, round_trip_s) -> None:
        """The :class:`~fedlora_jax.algorithms.RoundReport` of the round (``self.reports``):
        FLOPs from the cost model over the slots each client trained and the steps it ran, its
        measured compute seconds, the payload bytes, and transfer seconds ``round trip -
        compute`` split by bytes (0, so no link update, where no round trip was measured)."""
        dep = self.dep
        if dep.algorithm.observe is None:
            self.report = None
            return
        c = len(p.ids)
        ok = np.zeros(c, bool)
        ok[np.asarray(rows, np.int64)] = True
        steps, compute_s, bytes_up, up_s, down_s = (np.zeros(c) for _ in range(5))
        for i in rows:
            arrays, metrics = replies[int(p.ids[i])]
            steps[i], compute_s[i] = float(metrics["steps"]), float(metrics["compute-s"])
            bytes_up[i] = pl.payload_bytes(arrays)
            rt = float(round_trip_s.get(int(p.ids[i]), 0.0))
            if np.isfinite(rt) and rt > compute_s[i]:
                transfer = rt - compute_s[i]
                share = bytes_up[i] / max(bytes_up[i] + p.bytes_down[i], 1.0)
                up_s[i], down_s[i] = transfer * share, transfer * (1.0 - share)
        ranks = dev_lib.ranks_from_masks({k: np.asarray(v) for k, v in p.spec.update_masks.items()}, dep.model_shape)
        per_step = dev_lib.client_flops(np.asarray(ranks), np.asarray(p.spec.grad_cut), dep.model_shape,
                                        batch=dep.batch_size, steps=1)
        flops = np.asarray(per_step, np.float64) * steps
        self.report = RoundReport(p.ids, np.asarray(dep.client_devices)[p.ids], ok, flops, compute_s, bytes_up,
                                  up_s, p.bytes_down, down_s)

    def _observed(self, algo_state):
        if self.report is None:
            return algo_state
        ok = self.report.participated
        self.reports.append(self.report)
        return self.dep.algorithm.observe(algo_state, jax.tree.map(lambda x: np.asarray(x)[ok], self.report))

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The global adapter (all slots) and head, as a flat dict."""
        full = {k: np.ones(f.a.shape[-1], np.float32) for k, f in self.state.lora.items()}
        out = pl.pack_lora(_np_tree(self.state.lora), full, pl.FACTORS, prefix="global")
        out.update(pl.pack_tree(self.state.head, prefix="head"))
        return out


def _expected(p: _Pending, dep: Deployment, i: int) -> tuple[dict[str, np.ndarray], float | None]:
    """Client ``i`` of the pending round: its reply's expected layout and assigned examples."""
    return p.expected[i], None if dep.num_examples is None else float(p.examples[i])


def reply_layout(dep: Deployment, start, masks, update_masks) -> dict[str, np.ndarray]:
    """A payload of the layout client's reply must have (:meth:`ClientTrainer.__call__` packs it):
    its start over the update masks it was given, the head, the scores over its forward masks."""
    out = pl.pack_lora(start, update_masks, up_parts(dep.algorithm.aggregator, start), prefix="up")
    out.update(pl.pack_tree(dep.head, prefix="head"))
    if dep.algorithm.client.track_importance:
        out.update(pl.pack_slots({k: np.zeros(np.shape(m), np.float32) for k, m in masks.items()}, masks,
                                 prefix="scores"))
    return out


# ----------------------------------------------------------------------------- Flower glue


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: ndarray}`` -> ``ArrayRecord`` (numpy serialization, no pickle)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> ``{name: ndarray}``."""
    return {k: v.numpy() for k, v in record.items()}


class FedLoraStrategy(Strategy):
    """A Flower strategy that runs one of our algorithms (its aggregator) on a :class:`FedLoraServer`.

    Nodes are mapped to client ids by :meth:`discover` (a ``query`` message answered with the
    node's ``partition-id``). Each round every known, connected node takes part, or
    ``clients_per_round`` of them drawn with ``default_rng([seed, round])``.
    """

    def __init__(self, server: FedLoraServer, *, clients_per_round: int = 0):
        self.server = server
        self.clients_per_round = int(clients_per_round)
        self.node_of_client: dict[int, int] = {}
        self.timer: QuorumGrid | None = None  # the grid that timed the last round's replies

    def discover(self, grid: Grid, *, min_nodes: int, timeout: float) -> dict[int, int]:
        """Wait (up to ``timeout`` s) for ``min_nodes`` nodes, ask each for its partition id."""
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {min_nodes} nodes connected within {timeout} s")
            time.sleep(0.5)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
            if not reply.has_error():
                cid = int(reply.content["config"]["client-id"])
                if not 0 <= cid < self.server.dep.num_clients:
                    raise ValueError(f"node {reply.metadata.src_node_id} has partition-id {cid}, outside "
                                     f"[0, {self.server.dep.num_clients})")
                self.node_of_client[cid] = reply.metadata.src_node_id
        return self.node_of_client

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        connected = set(grid.get_node_ids())
        ids = sorted(c for c, n in self.node_of_client.items() if n in connected)
        if self.clients_per_round and len(ids) > self.clients_per_round:
            rng = np.random.default_rng([self.server.dep.seed, server_round])
            ids = sorted(rng.choice(ids, self.clients_per_round, replace=False).tolist())
        if not ids:
            return []
        msgs = []
        for cid, (arrs, cfg) in self.server.configure(ids).items():
            content = RecordDict({"arrays": to_record(arrs), "config": ConfigRecord(cfg)})
            msgs.append(Message(content, dst_node_id=self.node_of_client[cid], message_type=MessageType.TRAIN))
        return msgs

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got, round_trip = {}, {}
        client_of_node = {n: c for c, n in self.node_of_client.items()}
        timed = getattr(self.timer, "round_trip_s", {})
        for reply in replies:
            cid = client_of_node.get(reply.metadata.src_node_id)
            if reply.has_error() or cid is None:
                continue
            if reply.metadata.reply_to_message_id in timed:
                round_trip[cid] = timed[reply.metadata.reply_to_message_id]
            try:  # the client is who its node is; what it sends is checked by the server
                got[cid] = (from_record(reply.content["arrays"]), dict(reply.content["metrics"]))
            except (KeyError, TypeError, ValueError) as err:
                got[cid] = ({}, {"error": repr(err)})
        if self.server._pending is None:
            return None, None
        metrics = self.server.aggregate(got, round_trip)
        return to_record(self.server.global_arrays()), MetricRecord(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid) -> list[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        algo = self.server.dep.algorithm
        print(f"FedLoraStrategy: algorithm={algo.name} aggregator={algo.aggregator.name} "
              f"up={algo.aggregator.uplink_parts} down={algo.aggregator.downlink_parts}")


class QuorumGrid:
    """A ``Grid`` whose ``send_and_receive`` times each reply and may close a round early.

    ``round_trip_s``: ``{instruction message id: seconds from sending it to receiving the
    reply}`` of the last round (to within ``poll_s``). With ``min_replies`` > 0, once that
    many replies are in it waits at most ``straggler_timeout`` s more for the rest (a dead or
    slow node is then left out); never longer than the round ``timeout``. Everything else is
    the wrapped grid's."""

    def __init__(self, grid: Grid, *, min_replies: int = 0, straggler_timeout: float = 0.0, poll_s: float = 0.1):
        self._grid, self.min_replies, self.straggler_timeout, self.poll_s = grid, min_replies, straggler_timeout, poll_s
        self.round_trip_s: dict[str, float] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        sent = time.monotonic()
        pending = set(self._grid.push_messages(messages))
        self.round_trip_s = {}
        now = time.monotonic()
        end = now + (3600.0 if timeout is None else timeout)
        quorum_end, out = None, []
        while pending and now < end and (quorum_end is None or now < quorum_end):
            got = list(self._grid.pull_messages(pending))
            out.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            now = time.monotonic()
            self.round_trip_s.update({m.metadata.reply_to_message_id: now - sent for m in got})
            if quorum_end is None and self.min_replies and len(out) >= self.min_replies:
                quorum_end = now + self.straggler_timeout
            if pending:
                time.sleep(self.poll_s)
                now = time.monotonic()
        return out


def client_app(setup: Callable[[Context], Deployment]) -> ClientApp:
    """A Flower ``ClientApp`` for the deployment ``setup(context)`` builds (once per process).

    The node's ``--node-config`` must hold ``partition-id`` (its client id). Its
    :class:`ClientCache` (last trained adapter, folded base update) is kept in ``context.state``.
    """
    app = ClientApp()
    built: dict = {}

    def trainer(context: Context) -> ClientTrainer:
        if "t" not in built:
            built["t"] = ClientTrainer(setup(context))
        return built["t"]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"client-id": cid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t = trainer(context)
        config = dict(msg.content["config"])
        if int(config["client-id"]) != int(context.node_config["partition-id"]):
            raise ValueError(f"message for client {config['client-id']} reached partition "
                             f"{context.node_config['partition-id']}")
        cache = ClientCache()
        if CACHE_KEY in context.state:
            stored = from_record(context.state[CACHE_KEY])
            lora = pl.unpack_tree(stored, t.dep.lora, prefix="lora") if "lora/0" in stored else None
            base = {k[len("base_delta/"):]: v for k, v in stored.items() if k.startswith("base_delta/")}
            cache = ClientCache(lora, base or None, int(stored.get("base_round", np.zeros(())).item()))
        reply, metrics, new = t(from_record(msg.content["arrays"]), config, cache)
        stored = {"base_round": np.asarray(new.base_round, np.int64)}
        if new.lora is not None:
            stored.update(pl.pack_tree(new.lora, prefix="lora"))
        if new.base_delta is not None:
            stored.update({f"base_delta/{k}": np.asarray(v) for k, v in new.base_delta.items()})
        context.state[CACHE_KEY] = to_record(stored)
        return Message(RecordDict({"arrays": to_record(reply), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def server_app(setup: Callable[[Context], Deployment]) -> ServerApp:
    """A Flower ``ServerApp`` running :class:`FedLoraStrategy` for ``setup(context)``.

    Run config keys: ``num-server-rounds`` (1), ``min-nodes`` (1), ``clients-per-round`` (0 =
    every node), ``round-timeout`` (seconds, 600), ``min-replies`` and ``straggler-timeout``
    (0 = off: wait for every node or the round timeout; else close the round
    ``straggler-timeout`` s after ``min-replies`` replies, see :class:`QuorumGrid`, which also
    times each reply for the algorithm's ``observe``),
    ``output-dir`` (if set: ``global.npz`` with the final global adapter and head, and
    ``metrics.npz`` per round).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        server = FedLoraServer(setup(context))
        strategy = FedLoraStrategy(server, clients_per_round=int(cfg.get("clients-per-round", 0)))
        timeout = float(cfg.get("round-timeout", 600))
        strategy.discover(grid, min_nodes=int(cfg.get("min-nodes", 1)), timeout=timeout)
        grid = QuorumGrid(grid, min_replies=int(cfg.get("min-replies", 0)),
                          straggler_timeout=float(cfg.get("straggler-timeout", 0)))
        strategy.timer = grid
        result = strategy.start(grid, to_record(server.global_arrays()),
                                num_rounds=int(cfg.get("num-server-rounds", 1)), timeout=timeout)
        out = str(cfg.get("output-dir", ""))
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            np.savez(Path(out) / "global.npz", **server.global_arrays())
            per_round = {f"{r}/{k}": np.asarray(v) for r, m in result.train_metrics_clientapp.items()
                         for k, v in m.items()}
            np.savez(Path(out) / "metrics.npz", **per_round)

    return app


__all__ = ["ClientCache", "ClientTrainer", "Deployment", "FedLoraServer", "FedLoraStrategy", "QuorumGrid",
           "check_reply", "client_app", "down_parts", "fold_downlink", "from_record", "restarts", "server_app",
           "stacked_downlink", "to_record", "up_parts"]
