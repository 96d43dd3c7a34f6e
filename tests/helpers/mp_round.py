"""Rounds of the tiny model (tests/helpers/tiny.py) in one process or as one of several.

In-process: ``run(rounds)`` -> dict of NumPy results. As a worker of a multi-process run:
``python mp_round.py OUT.npz ROUNDS PORT PROCESS_ID NUM_PROCESSES``: joins the processes on
127.0.0.1:PORT, the mesh's "clients" axis spans every device of every process, each process
builds only its own clients' batches; process 0 writes the results to ``OUT.npz``. Every
process prints ``MP_ROUND_OK`` and the wall time of each round (the first one compiles).

Results: the global adapter and head after round 1 (``r1/...``) and after the last round
(``lora/...``, ``head/...``), per-round metrics (``metric/...``), ``round``, ``traces``.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

C, S, B, R = 4, 2, 3, 4


def _state_arrays(prefix, state):
    import numpy as np

    flat = {f"{prefix}lora/{k}/{p}": np.asarray(getattr(f, p)) for k, f in state.lora.items() for p in ("a", "b")}
    flat.update({f"{prefix}head/{k}": np.asarray(v) for k, v in state.head.items()})
    return flat


def run(rounds: int, *, multi: bool = False) -> tuple[dict, list]:
    """``(results, round_seconds)``; ``multi``: the processes are already initialized."""
    import jax
    import numpy as np
    import optax
    from helpers import tiny

    from fedlora_jax import lora as lora_lib
    from fedlora_jax.aggregation import get_aggregator
    from fedlora_jax.federated import init_server_state, make_round, make_spec, round_key
    from fedlora_jax.federated import multiprocess as mp

    key = jax.random.key(0)
    base = jax.tree.map(np.asarray, tiny.init_base(jax.random.fold_in(key, 1)))
    head = jax.tree.map(np.asarray, tiny.init_head(jax.random.fold_in(key, 2)))
    glob = lora_lib.init(jax.random.fold_in(key, 3), tiny.shapes(), R, std=0.2)
    agg = get_aggregator("zero_padding")
    state = init_server_state(glob, head, agg)
    masks = {k: np.stack([np.arange(R) < r for r in (1, 2, 3, 4)]).astype(np.float32) for k in tiny.keys()}
    mesh = mp.global_client_mesh() if multi else None
    n = mesh.shape["clients"] if multi else 1
    round_fn = make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=max(n, 2), mesh=mesh)
    lo, hi = mp.local_client_range(C, mesh) if multi else (0, C)
    runner = mp.DistributedRound(round_fn, mesh) if multi else round_fn
    history = {"train_loss": [], "client_loss": [], "client_update_norm": [], "client_weight": []}
    out, seconds = {}, []
    for r in range(rounds):
        t0 = time.perf_counter()
        ids = np.arange(C, dtype=np.int32)
        spec = make_spec(masks, num_steps=[2, 1, 2, 2], weight=[1.0, 2.0, 3.0, 4.0], client_id=ids,
                         num_layers=tiny.L, layer_of_key={k: i for i, k in enumerate(tiny.keys())})
        # A client's batches depend only on (round, client): each process builds its own rows.
        rows = [jax.tree.map(lambda x: np.asarray(x)[0], tiny.batches(jax.random.key(1000 * r + int(c)), 1, S, B))
                for c in ids[lo:hi]]
        local = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        state, m = runner(state, local, spec, round_key(0, r), base)
        for k in history:
            history[k].append(np.asarray(m[k]))
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - t0)
        if r == 0:
            out.update(_state_arrays("r1/", state))
    out.update(_state_arrays("", state))
    out.update({f"metric/{k}": np.stack(v) for k, v in history.items()})
    out["round"] = np.asarray(state.round)
    out["traces"] = np.asarray(round_fn.trace_count())
    return out, seconds


def main(argv):
    path, rounds, port, pid, n = argv[0], int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    from fedlora_jax.federated import multiprocess as mp

    mp.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid, initialization_timeout=60)
    import numpy as np

    out, seconds = run(rounds, multi=True)
    if mp.is_primary():
        np.savez(path, **out)
    print("MP_ROUND_OK " + " ".join(f"{s:.3f}" for s in seconds), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
