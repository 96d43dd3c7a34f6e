"""The experiment loop: sample, run the round, checkpoint, evaluate, log. The impure shell
around the pure core; every other job lives in its own module:

- :mod:`~fedlora_jax.driver.setup`: data, model, partition, ranks, algorithm; per-round inputs.
- :mod:`~fedlora_jax.driver.modes`: what differs between tasks (one file each).
- :mod:`~fedlora_jax.driver.device_stage`: the simulated devices' FLOPs, time and energy.
- :mod:`~fedlora_jax.driver.diagnostics`: the papers' diagnostics a run may log.
- :mod:`~fedlora_jax.driver.metrics_io`: ``metrics.jsonl``, the console, ``summary.json``.

``run_experiment(cfg, out_dir)`` writes::

    <out_dir>/config.json        the resolved config
    <out_dir>/metrics.jsonl      one JSON line per round
    <out_dir>/partition.txt      per-client data summary
    <out_dir>/checkpoints/       orbax checkpoints (see driver/checkpoint.py)
    <out_dir>/summary.json       final summary
    <out_dir>/samples.jsonl      generated samples (``generate_samples > 0``; LM tasks)

Randomness: one seed. Round ``t`` uses ``fold_in(key(seed), t)`` for the round (clients use
``fold_in(round_key, client_id)``) and NumPy ``default_rng([seed, t, ...])`` for sampling,
dropout and batches, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import data as data_lib
from fedlora_jax import devices as dev_lib
from fedlora_jax._atomic import atomic_write_bytes
from fedlora_jax.aggregation import round_bytes
from fedlora_jax.driver import checkpoint as ckpt
from fedlora_jax.driver import diagnostics, metrics_io
from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.driver.device_stage import simulate_devices
from fedlora_jax.driver.evaluation import generate_samples
from fedlora_jax.driver.lock import RunLock
from fedlora_jax.driver.metrics_io import log
from fedlora_jax.driver.setup import (
    DROPOUT_STREAM,
    batches_for,
    build_setup,
    client_spec,
    init_state,
    make_round_fn,
    sample_clients,
)
from fedlora_jax.federated import multiprocess as mp
from fedlora_jax.federated import round_key


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                   stop_after: int | None = None, cache_dir: Path | None = None) -> dict:
    """Run (or resume) an experiment. Returns the summary dict.

    Args:
      cfg: the experiment config.
      out_dir: run directory (created).
      resume: continue from the last checkpoint in ``out_dir`` (refused if the config differs,
        or if there is no checkpoint).
      quiet: no progress output.
      stop_after: stop after this many rounds in this call (testing / preemption drills).
      cache_dir: tokenization cache (default ``~/.cache/fedlora_jax``).

    ``out_dir`` is locked (:class:`~fedlora_jax.driver.lock.RunLock`) from before anything is
    written to it until this returns or raises: a second run on it raises ``RunLockedError``.

    Several JAX processes (:mod:`fedlora_jax.federated.multiprocess`, ``fedlora train
    --num-processes``): every process calls this with the same config and samples the same
    clients; each builds only its own clients' batches; process 0 locks ``out_dir`` and writes
    everything, the others only read it (the checkpoint, on resume).
    """
    out = Path(out_dir)
    if resume and not out.is_dir():  # nothing to lock, and nothing is created
        _refuse_resume(out)
    if not mp.is_primary():  # several processes: process 0 locks and writes, the others only read
        return _run_locked(cfg, out, resume=resume, quiet=True, stop_after=stop_after, cache_dir=cache_dir)
    with RunLock(out) as lock:
        if lock.took_over is not None:
            log(f"took over the stale lock of {out} ({lock.stale_reason})", quiet=quiet)
        return _run_locked(cfg, out, resume=resume, quiet=quiet, stop_after=stop_after, cache_dir=cache_dir)


def _run_locked(cfg: ExperimentConfig, out: Path, *, resume: bool, quiet: bool, stop_after: int | None,
                cache_dir: Path | None) -> dict:
    """The body of :func:`run_experiment`, run while ``out`` is locked."""
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    if resume and ckpt.latest_round(ckpt_dir) is None:  # checked under the lock: a running run is refused first
        _refuse_resume(out)
    if not resume and (ckpt.latest_round(ckpt_dir) is not None or metrics_path.exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or use a new "
                              "output directory")
    _sync_processes(ckpt_dir)
    setup = build_setup(cfg, quiet=quiet, cache_dir=cache_dir)
    _write_run_files(setup, out)
    state, start = init_state(setup), 0
    cumulative = {"bytes_up": 0.0, "bytes_down": 0.0, "sim_time_s": 0.0, "energy_j": 0.0}
    if resume:
        last, state, meta = ckpt.restore(ckpt_dir, state, fingerprint=cfg.fingerprint())
        start, cumulative = last + 1, meta.get("cumulative", cumulative)
        metrics_io.truncate_metrics(metrics_path, start)
        log(f"resumed from round {last} ({ckpt_dir})", quiet=quiet)
    round_fns: dict = {}

    def round_fn_for(spec):
        """One compiled round, or one per static gradient cut (``Algorithm.static_cut``)."""
        k = int(np.min(spec.grad_cut)) if setup.algo.static_cut else None
        if k not in round_fns:
            round_fns[k] = make_round_fn(setup, static_grad_cut=k)
        return round_fns[k]

    evaluate, evaluate_state = setup.mode.make_evaluator(setup)
    test_batches = jax.tree.map(jnp.asarray, setup.test_batches)
    if start == 0:
        ev0 = {k: v for k, v in evaluate_state(state).items() if not k.startswith("client_")}
        log(f"before training: {setup.mode.headline(ev0)}", quiet=quiet)
        metrics_io.append_jsonl(metrics_path, {"round": -1, **ev0})
    t_run, rounds_done, r = time.time(), 0, start - 1

    def round_inputs():  # host-side batch building, in a background thread one round ahead
        for rr in range(start, cfg.rounds):
            ids_r = sample_clients(cfg, rr)
            yield (ids_r, *batches_for(setup, ids_r, rr))

    prefetch = data_lib.Prefetcher(round_inputs(), depth=2)
    try:
        for r in range(start, cfg.rounds):
            t0 = time.time()
            ids, batch, num_steps, num_examples = next(prefetch)
            spec, sim = _plan_round(setup, state, r, ids, num_steps, num_examples)
            before = state
            state, m = round_fn_for(spec)(state, batch, spec, round_key(cfg.seed, r), setup.base)
            participated = np.asarray(m["client_weight"]) > 0
            if setup.algo.observe is not None:
                state = state._replace(algo=setup.algo.observe(state.algo, sim["report"]._replace(
                    participated=participated)))
            line = _round_line(setup, state, r, ids, m, spec, sim, participated, cumulative)
            if cfg.diagnose_first_round and r == 0:
                diagnostic = diagnostics.first_round_diagnostic(setup, before, state, spec, m, evaluate, test_batches)
                if diagnostic is not None:
                    line["first_round_diagnostic"] = diagnostic
            line.update(_evaluations(setup, state, r, evaluate, evaluate_state, test_batches))
            line["wall_s"] = round(time.time() - t0, 3)
            metrics_io.append_jsonl(metrics_path, line)
            if (r + 1) % cfg.checkpoint_every == 0 or r == cfg.rounds - 1:
                _save_checkpoint(ckpt_dir, r, state, fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
                                 extra_meta={"cumulative": cumulative})
            rounds_done += 1
            metrics_io.progress(r, cfg.rounds, line, setup.mode, t_run, rounds_done, quiet=quiet)
            if stop_after is not None and rounds_done >= stop_after:
                break
    finally:
        prefetch.close()
    mp.barrier("fedlora-rounds-done")  # several processes: process 0's metrics are complete
    finished = rounds_done > 0 and r == cfg.rounds - 1
    return _finish(setup, out, state, finished, sum(f.trace_count() for f in round_fns.values()), quiet=quiet)


def _plan_round(setup, state, r: int, ids, num_steps, num_examples):
    """The round's spec (the algorithm's plan, failures and stragglers at weight 0) and its
    simulated devices: ``(spec, {"bytes_up", "bytes_down", "flops", "times", "energy",
    "report", "round_s", "dropped", "stragglers"})``."""
    cfg = setup.cfg
    plan = setup.algo.plan(state, ids, r)
    dropped = np.random.default_rng([cfg.seed, r, DROPOUT_STREAM]).random(len(ids)) < cfg.dropout_prob
    weights = np.where(dropped, 0.0, num_examples.astype(np.float32))
    spec = client_spec(setup, plan, ids, num_steps, weights)
    if cfg.freeze_head and r == 0 and not any(np.any(np.asarray(m)) for m in spec.update_masks.values()):
        raise ValueError(f"config field 'freeze_head' = True: algorithm {cfg.algorithm!r} trains no adapter slot "
                         "in round 0, so with the head frozen nothing would train (set freeze_head=False)")
    head = {} if cfg.freeze_head else state.head  # a frozen head never travels
    bytes_up, bytes_down = round_bytes(setup.algo.aggregator, state.lora, head, spec.update_masks, spec.masks)
    flops, times, energy, report = simulate_devices(setup, spec, ids, r, bytes_up, bytes_down)
    round_s, kept = dev_lib.round_time(np.asarray(times.total_s), cfg.deadline_s or None, valid=weights > 0)
    stragglers = (weights > 0) & ~np.asarray(kept)
    spec = spec._replace(weight=np.where(stragglers, 0.0, weights).astype(np.float32))
    return spec, dict(bytes_up=bytes_up, bytes_down=bytes_down, flops=flops, times=times, energy=energy,
                      report=report, round_s=round_s, dropped=dropped, stragglers=stragglers)


def _round_line(setup, state, r: int, ids, m: dict, spec, sim: dict, participated, cumulative: dict) -> dict:
    """The ``metrics.jsonl`` line of a trained round (``cumulative`` is updated in place;
    ``state`` is after the round)."""
    up, down = float(np.sum(sim["bytes_up"][participated])), float(np.sum(sim["bytes_down"]))
    for k, v in (("bytes_up", up), ("bytes_down", down), ("sim_time_s", float(sim["round_s"])),
                 ("energy_j", float(np.sum(sim["energy"])))):
        cumulative[k] += v
    line = {
        "round": r,
        "clients": ids.tolist(),
        "client_device": [setup.ctx.device_profiles[d].name for d in setup.ctx.client_devices[ids]],
        "train_loss": float(m["train_loss"]),
        "train_accuracy": float(m["train_accuracy"]),
        "client_loss": np.asarray(m["client_loss"]).round(6).tolist(),
        "client_update_norm": np.asarray(m["client_update_norm"]).round(6).tolist(),
        "dropped_nonfinite": int(m["num_dropped_nonfinite"]),
        "dropped_failure": int(np.sum(sim["dropped"])),
        "dropped_deadline": int(np.sum(sim["stragglers"])),
        "bytes_up": up,
        "bytes_down": down,
        "client_bytes_up": sim["bytes_up"].tolist(),
        "client_bytes_down": sim["bytes_down"].tolist(),
        "sim_round_time_s": float(sim["round_s"]),
        "sim_energy_j": float(np.sum(sim["energy"])),
        "client_sim_time_s": np.asarray(sim["times"].total_s).round(6).tolist(),
        "client_flops": sim["flops"].tolist(),
        "active_ranks": {k: np.asarray(v).sum(-1).tolist() for k, v in spec.update_masks.items()},
        "grad_cut": np.asarray(spec.grad_cut).tolist(),
        **{f"cum_{k}": v for k, v in cumulative.items()},
    }
    global_masks = setup.algo.eval_masks(state.algo)
    if global_masks is not None:
        line["global_ranks"] = {k: int(np.asarray(v).sum()) for k, v in global_masks.items()}
    return line


def _evaluations(setup, state, r: int, evaluate, evaluate_state, test_batches) -> dict:
    """What round ``r`` logs about the global model: the task's test metrics every
    ``eval_every`` rounds and at the end (with the slot norms for labelled tasks), and the
    accuracy each of ``eval_distributed_ranks`` receives at the end."""
    cfg, out = setup.cfg, {}
    last = r == cfg.rounds - 1
    if (r + 1) % cfg.eval_every == 0 or last:
        out.update(evaluate_state(state))
        if setup.mode.labelled:
            out["global_slot_norm"] = diagnostics.global_slot_norms(state.lora)
    if cfg.eval_distributed_ranks and last:
        out["distributed_test_accuracy"] = diagnostics.distributed_accuracies(setup, state, evaluate, test_batches)
    return out


def _finish(setup, out: Path, state, finished: bool, traces: int, *, quiet: bool) -> dict:
    """Write ``summary.json`` (and, after the last round, the generated samples); print the
    summary and a few samples. Returns the summary."""
    cfg, mode = setup.cfg, setup.mode
    summary = metrics_io.summarize_run(metrics_io.read_metrics(out / "metrics.jsonl"), cfg, mode, traces)
    if setup.samples is not None and finished:
        samples = generate_samples(setup, state)
        if mp.is_primary():
            atomic_write_bytes(out / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in samples).encode())
        summary["samples"] = samples
    summary["model_switches"] = {f: getattr(setup.model.config, f, None) for f in ("norm_barrier", "merged_lora")}
    summary["algorithm_options"] = {k: _jsonable_option(v) for k, v in setup.algo.options.items()}
    if mp.is_primary():
        ckpt.write_json_atomic(out / "summary.json", summary)
    if finished and summary.get(f"final_{mode.headline_metric}") is not None:
        log(metrics_io.summary_text(summary, mode), quiet=quiet)
        if summary.get("samples"):
            log(metrics_io.samples_text(summary["samples"], out / "samples.jsonl"), quiet=quiet)
    return summary


def _write_run_files(setup, out: Path) -> None:
    """``config.json`` and ``partition.txt`` (process 0)."""
    if not mp.is_primary():
        return
    ckpt.write_json_atomic(out / "config.json", setup.cfg.to_dict())
    labels = setup.part_labels if setup.part_labels is not None else np.zeros(setup.train.num_examples, int)
    (out / "partition.txt").write_text(data_lib.partition_table(
        setup.parts, labels, len(setup.label_names), label_names=setup.label_names) + "\n")


def _jsonable_option(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)


def _refuse_resume(out: Path):
    raise FileNotFoundError(f"nothing to resume at {out}: it holds no checkpoint (start a new run without "
                            "--resume)")


def _sync_processes(ckpt_dir: Path) -> None:
    """Several processes: check that every process sees the same latest checkpoint (the run
    directory must be on a filesystem they share) and wait for all of them. No-op with one."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    latest = ckpt.latest_round(ckpt_dir)
    try:
        multihost_utils.assert_equal(np.int64(-1 if latest is None else latest), "latest checkpoint")
    except AssertionError as err:
        raise ValueError(f"the {jax.process_count()} processes of this run see different checkpoints in {ckpt_dir} "
                         f"(this one: {latest}); the run directory must be on a filesystem every process shares"
                         ) from err


def _save_checkpoint(ckpt_dir: Path, round_idx: int, state, **kw) -> None:
    """``ckpt.save``; several processes: by process 0 alone (the state is the same everywhere)."""
    if mp.is_primary():
        ckpt.save(ckpt_dir, round_idx, state, this_process_only=True, **kw)
