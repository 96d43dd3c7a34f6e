"""Multi-process JAX on 127.0.0.1: the round over a mesh whose "clients" axis spans two
processes equals the single-process round; the CLI launcher runs the driver the same way,
resumes, and fails fast (no hang) when a process dies.

Every process is started in its own process group and killed in ``finally``; every wait has
a timeout.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from helpers import mp_round, tiny
from helpers.tiny_bert import write_tiny_bert

from fedlora_jax.cli import main
from fedlora_jax.federated import init_server_state, make_round, make_spec, round_key
from fedlora_jax.federated import multiprocess as mp

HELPER = Path(mp_round.__file__).resolve()
TOL_F32 = dict(rtol=2e-5, atol=2e-6)  # cross-process all-reduce vs one device, float32
VOLATILE = {"wall_s"}
#: The pieces of gloo's one log line ("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of
#: connected peer ranks is : 1"), which both processes write to the shared stdout piece by piece, so
#: the pieces of the two processes' lines (and process 0's own print) can interleave anywhere between them.
GLOO_PIECES = re.compile(r"Expected number of connected peer ranks is :|\[Gloo\]|Rank|is connected to|peer ranks\.|\d+|\s+")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("FEDLORA_TEST_FAIL_PROCESS", None)
    env.update(extra)
    return env


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait(timeout=30)


def _run_all(cmds, env, tmp_path: Path, timeout_s: float):
    """Start every command in its own process group; wait for all (bounded); kill all in finally.
    Returns ``[(returncode, stdout, stderr)]``."""
    procs, files = [], []
    try:
        for i, cmd in enumerate(cmds):
            out, err = open(tmp_path / f"p{i}.out", "w+"), open(tmp_path / f"p{i}.err", "w+")
            files += [out, err]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
    res = []
    for i, p in enumerate(procs):
        res.append((p.returncode, (tmp_path / f"p{i}.out").read_text(), (tmp_path / f"p{i}.err").read_text()))
    for f in files:
        f.close()
    return res


def _assert_close(single: dict, multi: dict, prefixes=("r1/", "lora/", "head/", "metric/")):
    keys = [k for k in single if k.startswith(prefixes)]
    assert keys and set(keys) <= set(multi)
    for k in keys:
        np.testing.assert_allclose(multi[k], single[k], err_msg=k, **TOL_F32)


# -- the library, in two processes -----------------------------------------------------------

@pytest.fixture(scope="module")
def single_reference():
    out, _ = mp_round.run(3)
    return out


@pytest.mark.parametrize("devices_per_process", [
    pytest.param(1, marks=[pytest.mark.slow, pytest.mark.smoke]),
    pytest.param(2, marks=pytest.mark.slow),
])
def test_two_processes_one_and_three_rounds_equal_single_process(single_reference, tmp_path, devices_per_process):
    port = _free_port()
    path = tmp_path / "multi.npz"
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    cmds = [[sys.executable, str(HELPER), str(path), "3", str(port), str(i), "2"] for i in range(2)]
    res = _run_all(cmds, env, tmp_path, timeout_s=300)
    for rc, out, err in res:
        assert rc == 0 and "MP_ROUND_OK" in out, err[-3000:]
    multi = dict(np.load(path))
    _assert_close(single_reference, multi)     # after round 1 (r1/...) and after round 3, metrics per round
    assert int(multi["round"]) == 3 and int(multi["traces"]) == 1


# -- the library, single process (fast) --------------------------------------------------------

def test_initialize_single_process_and_argument_checks(monkeypatch):
    for name in (mp.ENV_COORDINATOR, mp.ENV_NUM_PROCESSES, mp.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert mp.initialize(num_processes=1) == (0, 1)
    with pytest.raises(ValueError, match="process_id must be in"):
        mp.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="give all of"):
        mp.initialize("127.0.0.1:1", num_processes=2)
    monkeypatch.setenv(mp.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="FEDLORA_NUM_PROCESSES"):
        mp.initialize()


def test_local_range_client_arrays_replicate_to_host_one_process():
    mesh = mp.global_client_mesh()
    n = mesh.shape["clients"]
    assert mp.local_client_range(2 * n, mesh) == (0, 2 * n)
    with pytest.raises(ValueError, match="multiple of the mesh's 'clients' axis"):
        mp.local_client_range(0, mesh)
    x = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
    g = mp.client_arrays({"x": x}, mesh, num_clients=2 * n)
    assert g["x"].shape == x.shape
    with pytest.raises(ValueError, match="expected"):
        mp.client_arrays({"x": x[:1]}, mesh, num_clients=2 * n)
    tree = {"k": jax.random.key(3), "v": np.ones((2,), np.int32)}
    rep = mp.replicate(tree, mesh)
    assert rep["v"].sharding.is_fully_replicated
    back = mp.to_host((rep, g))
    np.testing.assert_array_equal(back[1]["x"], x)
    np.testing.assert_array_equal(jax.random.key_data(back[0]["k"]), jax.random.key_data(tree["k"]))


def test_distributed_round_on_one_process_equals_plain_round(single_reference):
    out = single_reference
    key = jax.random.key(0)
    base = tiny.init_base(jax.random.fold_in(key, 1))
    head = tiny.init_head(jax.random.fold_in(key, 2))
    from fedlora_jax import lora as lora_lib
    from fedlora_jax.aggregation import get_aggregator

    glob = lora_lib.init(jax.random.fold_in(key, 3), tiny.shapes(), mp_round.R, std=0.2)
    agg = get_aggregator("zero_padding")
    mesh = mp.global_client_mesh()
    masks = {k: np.stack([np.arange(mp_round.R) < r for r in (1, 2, 3, 4)]).astype(np.float32) for k in tiny.keys()}
    spec = make_spec(masks, num_steps=[2, 1, 2, 2], weight=[1.0, 2.0, 3.0, 4.0], client_id=np.arange(4),
                     num_layers=tiny.L, layer_of_key={k: i for i, k in enumerate(tiny.keys())})
    rows = [jax.tree.map(lambda x: np.asarray(x)[0], tiny.batches(jax.random.key(c), 1, mp_round.S, mp_round.B))
            for c in range(4)]
    batches = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    runner = mp.DistributedRound(make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=2, mesh=mesh),
                                 mesh)
    state, m = runner(init_server_state(glob, head, agg), batches, spec, round_key(0, 0), base)
    assert isinstance(m["train_loss"], np.ndarray)
    for k in glob:
        np.testing.assert_allclose(np.asarray(state.lora[k].a), out[f"r1/lora/{k}/a"], **TOL_F32)
    np.testing.assert_allclose(m["client_loss"], out["metric/client_loss"][0], **TOL_F32)


def test_cli_process_flags_refused_without_coordinator(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    assert main(["train", "--config", str(cfg), "--num-processes", "2", "--process-id", "1"]) == 2
    assert "--process-id needs --coordinator" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--coordinator", "127.0.0.1:1"]) == 2
    assert main(["train", "--config", str(cfg), "--num-processes", "0"]) == 2


# -- the driver through the CLI launcher ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """``(config.json, cache dir)`` of a tiny random BERT run (2 of 4 clients, 2 rounds)."""
    root = tmp_path_factory.mktemp("mp_driver")
    model = str(write_tiny_bert(root / "tiny_bert"))
    cfg = dict(name="tiny-mp", model=model, dataset="sst2", max_length=16, train_limit=200, test_limit=40,
               num_clients=4, clients_per_round=2, rounds=2, local_steps=2, batch_size=4, r_max=4, lora_alpha=8.0,
               client_ranks=[1, 2, 4], algorithm="hetlora", chunk_size=2, eval_batch_size=20,
               target_modules=["query", "value"], device_mix=["jetson_agx_orin_64gb", "raspberry_pi_5_8gb"],
               lr=5e-3, checkpoint_every=1)
    path = root / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path, root / "cache"


@pytest.fixture(scope="module")
def tiny_run_config(tiny_config):
    """``(config.json, single-process run dir, cache dir)``."""
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.driver.run import run_experiment

    path, cache = tiny_config
    single = path.parent / "single"
    run_experiment(load_config(path), single, quiet=True, cache_dir=cache)
    return path, single, cache


def _rows(run):
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _launch(config, out, cache, tmp_path, *extra, timeout_s=300, env_extra=None):
    """``python -m fedlora_jax train ... --num-processes 2`` in its own process group (its two
    children share it): killed as a group in finally."""
    cmd = [sys.executable, "-m", "fedlora_jax", "train", "--config", str(config), "--out", str(out), "--quiet",
           "--no-plots", "--num-processes", "2", "--launch-timeout", str(timeout_s - 30), *extra]
    env = _env(FEDLORA_CACHE=str(cache), **(env_extra or {}))
    return _run_all([cmd], env, tmp_path, timeout_s=timeout_s)[0]


@pytest.mark.slow
@pytest.mark.smoke
def test_cli_two_processes_driver_equals_single_process(tiny_run_config, tmp_path):
    config, single, cache = tiny_run_config
    out = tmp_path / "multi"
    rc, stdout, err = _launch(config, out, cache, tmp_path)
    assert rc == 0, err[-3000:]
    # printed once, by process 0; besides it stdout holds only gloo's log pieces, interleaved anyhow
    assert stdout.count(str(out)) == 1, stdout
    assert GLOO_PIECES.sub("", stdout.replace(str(out), "")) == "", stdout
    assert _rows(out) == _rows(single)                   # metrics.jsonl: written once, same values
    s_multi, s_single = (json.loads((d / "summary.json").read_text()) for d in (out, single))
    assert s_multi == s_single
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 1
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_cli_two_processes_resume_equals_uninterrupted(tiny_run_config, tmp_path):
    config, single, cache = tiny_run_config
    out = tmp_path / "resumed"
    rc, _, err = _launch(config, out, cache, tmp_path, "--stop-after", "1")
    assert rc == 0, err[-3000:]
    assert len(_rows(out)) == 2
    rc, _, err = _launch(config, out, cache, tmp_path, "--resume")
    assert rc == 0, err[-3000:]
    assert _rows(out) == _rows(single)


def test_launcher_stops_everything_when_a_process_dies(tiny_config, tmp_path):
    config, cache = tiny_config
    rc, _, err = _launch(config, tmp_path / "dies", cache, tmp_path, timeout_s=150,
                         env_extra={"FEDLORA_TEST_FAIL_PROCESS": "1"})
    assert rc != 0, err[-3000:]
    assert "error: process 1 of 2 exited with code 17; stopping the other processes" in err
