"""Atomic checkpoints (orbax) of the server state, with a metadata file that guards resumes.

Layout under ``<run>/checkpoints/``::

    round_00003/          orbax checkpoint of the state's leaves (written to a temp dir, renamed)
    round_00003.json      metadata: round, config fingerprint, config, leaf shapes/dtypes
    latest.json           {"round": 3}: written last, atomically (os.replace)

A checkpoint is used only if ``latest.json``, its metadata and its orbax directory are all
present and consistent; a checkpoint from a different config (fingerprint) is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedlora_jax._atomic import atomic_write_json


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or from a different config."""


write_json_atomic = atomic_write_json


def _leaf_meta(leaves) -> list[list]:
    return [[list(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)]
            for x in leaves]


def _checkpointer(ocp, this_process_only: bool):
    """``StandardCheckpointer``; ``this_process_only``: orbax treats the calling process as the
    only participant (no cross-process barriers), so one process of a multi-process run saves."""
    if not this_process_only or jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=opts)


def save(ckpt_dir: Path, round_idx: int, state: Any, *, fingerprint: str, config: dict,
         extra_meta: dict | None = None, keep: int = 2, this_process_only: bool = False) -> Path:
    """Save ``state`` (any pytree of arrays) after round ``round_idx`` finished.

    Order: orbax writes ``round_XXXXX`` (itself atomic: temp dir then rename), then the
    metadata JSON, then ``latest.json``. A crash at any point leaves the previous checkpoint
    as ``latest``. Older checkpoints beyond ``keep`` are removed. ``this_process_only``: in a
    multi-process run, only the calling process saves (the state is identical everywhere).
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).resolve()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"round_{round_idx:05d}"
    target = ckpt_dir / name
    if target.exists():
        shutil.rmtree(target)
    leaves = jax.tree.leaves(state)
    payload = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    with _checkpointer(ocp, this_process_only) as ckptr:
        ckptr.save(target, payload)
        ckptr.wait_until_finished()
    meta = {"round": round_idx, "fingerprint": fingerprint, "config": config,
            "leaves": _leaf_meta(leaves), **(extra_meta or {})}
    write_json_atomic(ckpt_dir / f"{name}.json", meta)
    write_json_atomic(ckpt_dir / "latest.json", {"round": round_idx, "name": name})
    _prune(ckpt_dir, keep)
    return target


def _prune(ckpt_dir: Path, keep: int) -> None:
    rounds = sorted(p for p in ckpt_dir.glob("round_*") if p.is_dir())
    for p in rounds[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        meta = p.with_suffix(".json")
        if meta.exists():
            meta.unlink()


def latest_round(ckpt_dir: Path) -> int | None:
    """Round of the latest complete checkpoint, or ``None`` if there is none."""
    p = Path(ckpt_dir) / "latest.json"
    if not p.is_file():
        return None
    try:
        return int(json.loads(p.read_text())["round"])
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{p} is corrupt ({err}); delete it to start over") from err


def restore(ckpt_dir: Path, template: Any, *, fingerprint: str) -> tuple[int, Any, dict]:
    """Restore the latest checkpoint into the structure of ``template``.

    Returns:
      ``(round_idx, state, meta)``.

    Raises:
      CheckpointError: no checkpoint, a different config, corrupt/truncated files, or leaves
        whose shapes/dtypes do not match ``template``.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).resolve()
    r = latest_round(ckpt_dir)
    if r is None:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} (latest.json missing)")
    name = f"round_{r:05d}"
    meta_path = ckpt_dir / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_path} is missing or corrupt: {err}") from err
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {ckpt_dir / name} was written by a different config (fingerprint "
            f"{meta.get('fingerprint')!r}, this run {fingerprint!r}); refusing to resume. Use a new "
            "output directory or the original config.")
    leaves, treedef = jax.tree.flatten(template)
    expected = _leaf_meta(leaves)
    if meta.get("leaves") != expected:
        raise CheckpointError(f"checkpoint {ckpt_dir / name} holds {len(meta.get('leaves', []))} leaves "
                              f"that do not match the state's {len(expected)} leaves (shapes/dtypes)")
    abstract = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype) for i, x in enumerate(leaves)}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            payload = ckptr.restore(ckpt_dir / name, abstract)
    except Exception as err:  # orbax raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {ckpt_dir / name} is corrupt or truncated: "
                              f"{type(err).__name__}: {err}") from err
    new_leaves = [payload[f"leaf_{i:05d}"] for i in range(len(leaves))]
    for i, (a, b) in enumerate(zip(new_leaves, leaves, strict=True)):
        if np.shape(a) != np.shape(b):
            raise CheckpointError(f"checkpoint leaf {i} has shape {np.shape(a)}, expected {np.shape(b)}")
    return r, jax.tree.unflatten(treedef, new_leaves), meta
