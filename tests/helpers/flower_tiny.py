"""A Flower deployment of a registered algorithm on the tiny model (tests and the runbook).

Used in-process by ``tests/deploy/test_flower.py`` and, copied with ``tiny.py`` and
``algo_rounds.py`` into ``helpers/`` of a Flower app directory (:func:`write_app`), as the
app module of a real deployment (``server_app`` / ``client_app`` below). Run config: ``method``, ``seed``, ``lr``,
``local-steps``; node config: ``partition-id`` and, for the dropout test only,
``stall-file`` (the client writes it and then blocks in its data loader until killed).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax
from helpers import algo_rounds, tiny

from fedlora_jax.algorithms import build_algorithm

BATCH = 4


def client_batches(seed: int, client_id: int, round_idx: int, steps: int):
    """One client's data of one round, leaves ``[S, B, ...]`` (host numpy)."""
    key = jax.random.fold_in(jax.random.key(seed), 1000 + 97 * round_idx + client_id)
    return jax.tree.map(lambda x: np.asarray(x[0]), tiny.batches(key, 1, steps, BATCH))


def round_batches(seed: int, ids, round_idx: int, steps: int):
    """The simulator's view: the clients' batches stacked, leaves ``[C, S, B, ...]``."""
    per = [client_batches(seed, int(c), round_idx, steps) for c in ids]
    return jax.tree.map(lambda *x: np.stack(x), *per)


def deployment(name: str, *, seed: int = 0, lr: float = 5e-2, steps: int = 3, options=None, stall_file: str = ""):
    from fedlora_jax.deploy.flower import Deployment

    ctx = algo_rounds.context(seed=seed)
    algo = build_algorithm(name, ctx, **(options or {}))
    key = jax.random.key(seed)

    def data(cid, r):
        if stall_file:
            Path(stall_file).write_text(f"client {cid} round {r}\n")
            time.sleep(600)  # killed by the test while "training"
        return client_batches(seed, cid, r, steps)

    def num_examples(cid, r):  # the server knows each client's partition (here: its generator)
        return float(np.sum(client_batches(seed, cid, r, steps)["example_mask"]))

    return Deployment(task=tiny.TASK, algorithm=algo, optimizer=optax.adam(lr), num_examples=num_examples,
                      lora=algo_rounds.init_lora(algo.init_scheme, seed), head=tiny.init_head(jax.random.fold_in(key, 2)),
                      base=tiny.init_base(jax.random.fold_in(key, 1)), client_data=data,
                      num_clients=algo_rounds.POPULATION, num_layers=tiny.L, layer_of_key=ctx.layer_of_key, seed=seed,
                      model_shape=ctx.model_shape, batch_size=BATCH, client_devices=ctx.client_devices,
                      scale=ctx.scale)


def setup(context):
    """``setup(context) -> Deployment`` for the Flower apps (run config + node config)."""
    cfg = context.run_config
    return deployment(str(cfg.get("method", "fedit")), seed=int(cfg.get("seed", 0)), lr=float(cfg.get("lr", 5e-2)),
                      steps=int(cfg.get("local-steps", 3)),
                      stall_file=str(getattr(context, "node_config", {}).get("stall-file", "")))


APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlora-tiny"
version = "1.0.0"
description = "fedlora_jax on Flower: a registered method on the tiny test model"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "helpers.flower_tiny:server_app"
clientapp = "helpers.flower_tiny:client_app"

[tool.flwr.app.config]
method = "{method}"
seed = {seed}
lr = {lr}
local-steps = {steps}
num-server-rounds = 1
min-nodes = {min_nodes}
min-replies = {min_replies}
straggler-timeout = {straggler_timeout}
round-timeout = {round_timeout}
output-dir = "{output_dir}"
"""


def write_app(app_dir, *, method="fedit", seed=0, lr=5e-2, steps=3, min_nodes=3, min_replies=0,
              straggler_timeout=0.0, round_timeout=600.0, output_dir=""):
    """A Flower app directory running ``method`` on the tiny model (``flwr run APP_DIR ...``)."""
    app_dir = Path(app_dir)
    (app_dir / "helpers").mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in ("tiny.py", "algo_rounds.py", "flower_tiny.py"):
        (app_dir / "helpers" / name).write_text((here / name).read_text())
    (app_dir / "pyproject.toml").write_text(APP_TOML.format(
        method=method, seed=seed, lr=lr, steps=steps, min_nodes=min_nodes, min_replies=min_replies,
        straggler_timeout=float(straggler_timeout), round_timeout=float(round_timeout), output_dir=output_dir))
    return app_dir


def _apps():
    from fedlora_jax.deploy import flower

    return flower.server_app(setup), flower.client_app(setup)


try:
    server_app, client_app = _apps()
except ImportError:  # flwr not installed: the in-process helpers above still import
    server_app = client_app = None
