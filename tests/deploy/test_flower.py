"""The Flower deployment equals the simulator's round.

(1) in-process: the ClientApp's training function (:class:`ClientTrainer`) and the strategy's
server half (:class:`FedLoraServer`), fed the simulator's seeds, data and specs, give the
same global adapter, head and aggregator state as ``make_round`` (two rounds, so per-client
state and the client's own cache are exercised), and the payloads hold only active slots.
(2) slow: a real Deployment Engine on 127.0.0.1: ``flower-superlink``, three
``flower-supernode`` processes and ``flwr run``; one round equals the simulator's, and a
supernode killed mid-round is dropped while the round completes with the other two (insecure);
with TLS (a CA and server certificate made by the test) and node authentication (EC keys
made by the test, two registered with ``flwr supernode register``), a round equals the
simulator's over the two registered nodes and the third, unknown node is refused.
Every process is started in its own process group and killed in ``finally``; every wait
is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flwr")

from helpers import flower_tiny, tiny  # noqa: E402

from fedlora_jax.aggregation import round_bytes  # noqa: E402
from fedlora_jax.deploy import payload_bytes  # noqa: E402
from fedlora_jax.deploy.flower import ClientTrainer, FedLoraServer, up_parts  # noqa: E402
from fedlora_jax.deploy.payload import FACTORS, factor_parts, pack_lora, pack_tree  # noqa: E402
from fedlora_jax.federated import ServerHyper, init_server_state, make_round, make_spec, round_key  # noqa: E402
from fedlora_jax.federated.server import SCALAR_METRICS  # noqa: E402

TOL_F32 = dict(rtol=2e-5, atol=2e-6)  # one client jitted alone vs vmapped in the round, float32
SEED, STEPS, LR = 0, 3, 5e-2
FAST = ("fedsa",)   # client-local factors: the hardest case; the rest run under -m slow
OTHERS = ("adalora", "fedara", "fedex", "ffa", "fedit", "flexlora", "flora", "hafl", "hetlora", "legend", "replication")


def simulate(name, rounds_ids, hyper=None, log=None, reports=None):
    """The simulator: ``make_round`` on the same data, weights = example counts; ``log``: a list
    that gets each round's metrics; ``reports``: the devices' report of each round, given to
    the algorithm's ``observe`` (LEGEND learns from them)."""
    dep = flower_tiny.deployment(name, seed=SEED, lr=LR, steps=STEPS)
    algo = dep.algorithm
    state = init_server_state(dep.lora, dep.head, algo, num_clients=dep.num_clients)
    rf = make_round(tiny.TASK, algo, optimizer=optax.adam(LR), chunk_size=2)
    for r, ids in enumerate(rounds_ids):
        ids = np.asarray(ids, np.int32)
        plan = algo.plan(state, ids, r)
        data = flower_tiny.round_batches(SEED, ids, r, STEPS)
        counts = np.sum(data["example_mask"], axis=(1, 2)).astype(np.float32)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, depth_mask=plan.depth_mask,
                         global_masks=plan.global_masks, num_steps=[STEPS] * len(ids), weight=counts,
                         client_id=ids, num_layers=tiny.L, layer_of_key=dict(dep.layer_of_key))
        state, metrics = rf(state, data, spec, round_key(SEED, r), dep.base, hyper)
        if log is not None:
            log.append(jax.device_get(metrics))
        if reports is not None and algo.observe is not None:
            ok = reports[r].participated
            state = state._replace(algo=algo.observe(state.algo, jax.tree.map(lambda x, ok=ok: x[ok], reports[r])))
    return state


def deploy_in_process(name, rounds_ids, drop=(), hyper=None, log=None):
    """The Flower app's two halves without Flower's transport; ``drop``: client ids that never
    answer; ``log``: a list that gets each round's metrics."""
    dep = flower_tiny.deployment(name, seed=SEED, lr=LR, steps=STEPS)._replace(hyper=hyper)
    server, trainer, caches, sizes = FedLoraServer(dep), ClientTrainer(dep), {}, []
    for ids in rounds_ids:
        replies = {}
        for cid, (arrays, config) in server.configure(ids).items():
            if cid in drop:
                continue
            reply, metrics, caches[cid] = trainer(arrays, config, caches.get(cid))
            replies[cid] = (reply, metrics)
            sizes.append((payload_bytes(reply), payload_bytes(arrays, skip_masks=True)))
        metrics = server.aggregate(replies)
        if log is not None:
            log.append(metrics)
    return server, sizes, caches


def assert_close(x, y):
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), **TOL_F32)


def assert_deployment_matches(name, rounds_ids, sim_rounds_ids=None, drop=()):
    server, _, caches = deploy_in_process(name, rounds_ids, drop)
    sim = simulate(name, rounds_ids if sim_rounds_ids is None else sim_rounds_ids, reports=server.reports)
    got = server.state
    assert_close((got.round, got.lora, got.head, got.agg_state, got.algo), (sim.round, sim.lora, sim.head,
                                                                            sim.agg_state, sim.algo))
    agg = server.dep.algorithm.aggregator
    if server.dep.algorithm.client_state is None:
        return
    if up_parts(agg, got.lora) == factor_parts(FACTORS, got.lora):
        assert_close(got.clients, sim.clients)  # the server holds it all (HAFL's score history)
    else:  # factors that never leave the device (FedSA's b): the client's own copy is the state
        for cid, cache in caches.items():
            assert_close(cache.lora, jax.tree.map(lambda x, c=cid: x[c], sim.clients))


ROUNDS = ([0, 2, 4], [1, 2, 5])  # client 2 twice: its cached adapter is the fill of round 1


@pytest.mark.parametrize("name", FAST)
def test_client_and_strategy_equal_simulated_round(name):
    assert_deployment_matches(name, ROUNDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_client_and_strategy_equal_simulated_round_all_methods(name):
    assert_deployment_matches(name, ROUNDS)


def test_server_hyper_and_metrics_as_the_simulator():
    """The deployment's server half is the simulator's: a server learning rate
    (``ServerHyper``) acts the same, and the round reports the simulator's metric names and
    values."""
    hyper = ServerHyper(server_lr=jnp.float32(0.5))
    got_log, sim_log = [], []
    server, _, _ = deploy_in_process("hetlora", [[0, 1, 2]], hyper=hyper, log=got_log)
    sim = simulate("hetlora", [[0, 1, 2]], hyper=hyper, log=sim_log)
    assert_close((server.state.lora, server.state.head), (sim.lora, sim.head))
    plain = simulate("hetlora", [[0, 1, 2]])
    assert not np.allclose(plain.head["w"], sim.head["w"])  # the learning rate did something
    for name in SCALAR_METRICS:
        np.testing.assert_allclose(got_log[0][name], sim_log[0][name], **TOL_F32)
    assert got_log[0]["num_clients"] == 3 and got_log[0]["num_rejected"] == 0


def test_legend_observes_the_measured_times():
    """LEGEND on Flower learns from what the devices measured: each client's compute seconds
    (timed around its compiled training), and the transfer seconds of its round trip (here
    0.25 s more than its compute time) split by payload bytes; the capacity estimates move by
    LEGEND's EMA toward work / measured time."""
    dep = flower_tiny.deployment("legend", seed=SEED, lr=LR, steps=STEPS)
    server, trainer = FedLoraServer(dep), ClientTrainer(dep)
    before = jax.device_get(server.state.algo)
    ids = [0, 1, 2, 3]
    replies, round_trip = {}, {}
    for cid, (arrays, config) in server.configure(ids).items():
        replies[cid] = trainer(arrays, config)[:2]
        round_trip[cid] = replies[cid][1]["compute-s"] + 0.25
    server.aggregate(replies, round_trip)
    rep = server.reports[0]
    np.testing.assert_allclose(rep.compute_s, [replies[c][1]["compute-s"] for c in ids])
    assert np.all(rep.participated) and np.all(rep.compute_s > 0) and np.all(rep.flops > 0)
    np.testing.assert_allclose(rep.up_s + rep.down_s, 0.25, rtol=1e-9)
    np.testing.assert_allclose(rep.up_s / rep.down_s, rep.bytes_up / rep.bytes_down, rtol=1e-9)
    rho, after = dep.algorithm.options["rho"], jax.device_get(server.state.algo)
    for d in np.unique(rep.device_ids):
        sel = rep.device_ids == d
        mean = lambda x, sel=sel: float(np.mean(x[sel]))
        np.testing.assert_allclose(after.flops_per_s[d], rho * before.flops_per_s[d]
                                   + (1 - rho) * mean(rep.flops) / mean(rep.compute_s), rtol=1e-5)
        np.testing.assert_allclose(after.uplink_bps[d], rho * before.uplink_bps[d]
                                   + (1 - rho) * 8 * mean(rep.bytes_up) / mean(rep.up_s), rtol=1e-5)
        np.testing.assert_allclose(after.downlink_bps[d], rho * before.downlink_bps[d]
                                   + (1 - rho) * 8 * mean(rep.bytes_down) / mean(rep.down_s), rtol=1e-5)


def test_flora_downlink_is_the_counted_stack():
    """FLoRA's clients receive only the stacked factors of the last round's clients (their
    product is the base update; the adapter restarts from the round-0 one they hold): in the
    second round of the same clients the downlink payload is ``round_bytes``' downlink, and
    two rounds equal the simulator's."""
    ids = [0, 1, 2]
    server, sizes, _ = deploy_in_process("flora", [ids, ids])
    dep = server.dep
    plan = dep.algorithm.plan(server.state, np.asarray(ids), 1)
    _, down = round_bytes(dep.algorithm.aggregator, dep.lora, dep.head, plan.update_masks, plan.masks)
    np.testing.assert_array_equal([s[1] for s in sizes[len(ids):]], down)
    assert_deployment_matches("flora", [ids, ids])


@pytest.mark.parametrize("rounds, gets", [(([0, 3], [0], [0, 3]), "stacks"), (([0, 1, 2], [0, 1], [0, 1, 2]), "dense")])
def test_flora_client_that_missed_a_round(rounds, gets):
    """A FLoRA client back after a missed round receives the stacks of both rounds it lacks
    (ranks 1: smaller than the dense update) or the dense base update (ranks 1, 2, 4: the
    stacks would be larger); either way three rounds equal the simulator's."""
    server, _, _ = deploy_in_process("flora", rounds[:2])
    back = rounds[2][-1]
    arrays, _ = server.configure(rounds[2])[back]
    kinds = {k.split("/")[0] + ("/" + k.split("/")[1] if k.startswith("stack/") else "") for k in arrays
             if k.startswith(("stack/", "base_delta/"))}
    assert kinds == ({"stack/0", "stack/1"} if gets == "stacks" else {"base_delta"})
    assert_deployment_matches("flora", list(rounds))


def test_dropped_client_is_left_out():
    assert_deployment_matches("hetlora", [[0, 1, 2]], [[0, 1]], drop={2})


def test_uplink_bytes_are_the_counted_bytes():
    """Only active slots travel: the uplink payload is ``round_bytes``' uplink, per client."""
    ids = [0, 1, 2]
    server, sizes, _ = deploy_in_process("hetlora", [ids])
    dep = server.dep
    plan = dep.algorithm.plan(server.state, np.asarray(ids), 0)
    up, down = round_bytes(dep.algorithm.aggregator, dep.lora, dep.head, plan.update_masks, plan.masks)
    np.testing.assert_array_equal([s[0] for s in sizes], up)
    np.testing.assert_array_equal([s[1] for s in sizes], down)
    assert len(set(up.tolist())) == 3  # ranks 1, 2, 4 really send different amounts


# ----------------------------------------------------------------------------- Deployment Engine

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(cond, timeout_s: float, what: str, procs=()):
    end = time.monotonic() + timeout_s
    while not cond():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"{what}: a process exited early: {dead}")
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.3)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _global_arrays(state):
    full = {k: np.ones(f.a.shape[-1], np.float32) for k, f in state.lora.items()}
    out = pack_lora(jax.tree.map(np.asarray, state.lora), full, FACTORS, prefix="global")
    out.update(pack_tree(state.head, prefix="head"))
    return out


def _launcher(tmp_path: Path, home: Path, procs: list):
    """``(env, start)``: the environment of the Flower commands and ``start(*cmd, log=name)``,
    which runs a command in its own process group (logged to ``tmp_path / name``) and adds
    it to ``procs``."""
    env = dict(os.environ, FLWR_HOME=str(home), JAX_PLATFORMS="cpu", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("XLA_FLAGS", None)

    def start(*cmd, log):
        with open(tmp_path / log, "w") as f:
            procs.append(subprocess.Popen(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                          start_new_session=True))
        return procs[-1]

    return env, start


def _stop_all(procs: list, tmp_path: Path) -> dict[str, str]:
    """Kill every process still running (its whole group); the tails of the logs."""
    for p in procs:
        if p.poll() is None:
            _kill_group(p)
    return {f.name: f.read_text()[-3000:] for f in tmp_path.glob("*.log")}


def _assert_round_over_clients_0_1(out: Path, logs: dict) -> None:
    """The app's outputs: one round over 2 clients, whose global adapter and head equal the
    simulator's round over clients 0 and 1."""
    assert (out / "global.npz").exists() and (out / "metrics.npz").exists(), logs
    with np.load(out / "metrics.npz", allow_pickle=False) as z:
        assert int(z["1/num_clients"]) == 2, logs
    with np.load(out / "global.npz", allow_pickle=False) as z:
        got = dict(z)
    want = _global_arrays(simulate("fedit", [[0, 1]]))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL_F32)


@pytest.mark.slow
def test_deployment_engine_round_drops_a_killed_node(tmp_path):
    """flower-superlink + 3 flower-supernode (insecure, 127.0.0.1) + ``flwr run``: node 2 is
    killed while it trains; the round closes 5 s after the other two replied and equals the
    simulator's round over clients 0 and 1."""
    link, nodes = _free_port(), [_free_port() for _ in range(3)]
    home, out, stall = tmp_path / "flwr_home", tmp_path / "out", tmp_path / "node2.training"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    app = flower_tiny.write_app(tmp_path / "app", method="fedit", seed=SEED, lr=LR, steps=STEPS, min_nodes=3,
                                min_replies=2, straggler_timeout=5.0, round_timeout=100.0, output_dir=str(out))
    procs: list[subprocess.Popen] = []
    env, start = _launcher(tmp_path, home, procs)

    try:
        start(str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(link), "--database", str(home / "state.db"), log="superlink.log")
        _wait_for(lambda: _listening(link), 60, "superlink listening", procs)
        for i, port in enumerate(nodes):
            cfg = f"partition-id={i}" + (f" stall-file='{stall}'" if i == 2 else "")
            start(str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port), "--node-config", cfg, log=f"supernode{i}.log")
        run = start(str(BIN / "flwr"), "run", str(app), "local", "--stream", log="flwr_run.log")
        _wait_for(stall.exists, 120, "node 2 started training", procs)
        _kill_group(procs[2 + 1])  # supernode 2 (and its ClientApp process) dies mid-round
        _wait_for(lambda: (out / "global.npz").exists() or run.poll() is not None, 120, "the round finished")
        _wait_for(lambda: (out / "metrics.npz").exists(), 10, "metrics written")
    finally:
        logs = _stop_all(procs, tmp_path)
    _assert_round_over_clients_0_1(out, logs)


def _tls_material(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 signed by it, and three nodes' EC P-384 key pairs
    (OpenSSH format, as Flower's node authentication reads them)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, *extensions):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(issuer_key, hashes.SHA256())

    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()
    ca_key, srv_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("fedlora-test-ca", ca_key, "fedlora-test-ca", ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    srv = cert("127.0.0.1", srv_key, "fedlora-test-ca", ca_key,
               (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(srv.public_bytes(pem))
    (d / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, none))
    for i in range(3):
        k = ec.generate_private_key(ec.SECP384R1())
        (d / f"node{i}.key").write_bytes(k.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none))
        (d / f"node{i}.pub").write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH))


@pytest.mark.slow
def test_deployment_engine_tls_and_node_auth(tmp_path):
    """flower-superlink with TLS and ``--enable-supernode-auth`` on 127.0.0.1; nodes 0 and 1 are
    registered, node 2's key is not: node 2 is refused, the round runs over TLS with nodes 0
    and 1 and equals the simulator's round over clients 0 and 1."""
    link, nodes = _free_port(), [_free_port() for _ in range(3)]
    home, out, keys = tmp_path / "flwr_home", tmp_path / "out", tmp_path / "keys"
    home.mkdir()
    keys.mkdir()
    _tls_material(keys)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\nroot-certificates = "{keys / "ca.crt"}"\n')
    app = flower_tiny.write_app(tmp_path / "app", method="fedit", seed=SEED, lr=LR, steps=STEPS, min_nodes=2,
                                round_timeout=100.0, output_dir=str(out))
    procs: list[subprocess.Popen] = []
    env, start = _launcher(tmp_path, home, procs)

    def node(i):
        return start(str(BIN / "flower-supernode"), "--root-certificates", str(keys / "ca.crt"),
                     "--auth-supernode-private-key", str(keys / f"node{i}.key"), "--superlink", f"127.0.0.1:{link}",
                     "--host", "127.0.0.1", "--port", str(nodes[i]), "--node-config", f"partition-id={i}",
                     log=f"supernode{i}.log")

    try:
        start(str(BIN / "flower-superlink"), "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile",
              str(keys / "server.key"), "--ssl-ca-certfile", str(keys / "ca.crt"), "--enable-supernode-auth",
              "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link),
              "--database", str(home / "state.db"), log="superlink.log")
        _wait_for(lambda: _listening(link), 60, "superlink listening", procs)
        for i in (0, 1):
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys / f"node{i}.pub"), "local"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        unknown = node(2)
        node(0), node(1)
        run = start(str(BIN / "flwr"), "run", str(app), "local", "--stream", log="flwr_run.log")
        _wait_for(lambda: (out / "metrics.npz").exists() or run.poll() is not None, 240, "the round finished")
        _wait_for(lambda: unknown.poll() is not None, 60, "the unknown node refused")
    finally:
        logs = _stop_all(procs, tmp_path)
    _assert_round_over_clients_0_1(out, logs)
    assert unknown.returncode != 0 and "Failed to activate SuperNode" in logs["supernode2.log"], logs
