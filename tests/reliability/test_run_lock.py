"""One writer per run directory (issue 18): ``<run>/.lock`` refuses a second run with the holder's
pid, a stale lock (killed or dead holder) is taken over, the lock is released after a run and
after an exception.

Holders are real second processes (a tiny script that loads ``driver/lock.py`` by path, so it
starts in milliseconds); every one is bounded by a deadline and killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora_jax.cli import main
from fedlora_jax.driver import lock as lock_lib
from fedlora_jax.driver import run as driver_run
from fedlora_jax.driver.config import ExperimentConfig
from fedlora_jax.driver.lock import LOCK_NAME, RunLock, RunLockedError, read_lock

ROOT = Path(__file__).resolve().parents[2]
LOCK_PY = ROOT / "fedlora_jax" / "driver" / "lock.py"
QUICK = str(ROOT / "experiments" / "configs" / "quickstart.py")
DEADLINE_S = 60

# argv: lock.py, run dir, hold seconds, [go file: print "ready", wait for it]. Prints "won <pid>" or
# "refused <message>".
HOLDER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("fedlora_lock_under_test", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
if len(sys.argv) > 4:
    print("ready", flush=True)
    end = time.time() + 30
    while not os.path.exists(sys.argv[4]) and time.time() < end:
        time.sleep(0.001)
try:
    with m.RunLock(sys.argv[2]):
        print("won", os.getpid(), flush=True)
        time.sleep(float(sys.argv[3]))
except m.RunLockedError as err:
    print("refused", err, flush=True)
"""


def _spawn(run_dir: Path, hold_s: float, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(LOCK_PY), str(run_dir), str(hold_s), *extra],
                                stdout=f, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@contextlib.contextmanager
def holder(run_dir: Path, tmp_path: Path, hold_s: float = DEADLINE_S):
    """A second process holding ``run_dir``'s lock (it exits by itself after ``hold_s``)."""
    log = tmp_path / f"holder_{time.monotonic_ns()}.log"
    proc = _spawn(run_dir, hold_s, log=log)
    try:
        deadline = time.time() + DEADLINE_S
        while (read_lock(run_dir) or {}).get("pid") != proc.pid:
            assert proc.poll() is None, f"holder exited early: {log.read_text()}"
            assert time.time() < deadline, "holder never took the lock"
            time.sleep(0.02)
        yield proc
    finally:
        _stop(proc)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid  # reaped: no such process now


def _write_lock(run_dir: Path, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / LOCK_NAME
    p.write_text(json.dumps(info))
    return p


# ------------------------------------------------------------------ two processes, one directory

def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with holder(run, tmp_path) as proc:
        before = (run / LOCK_NAME).read_bytes()
        with pytest.raises(RunLockedError) as info:
            RunLock(run).acquire()
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and str(run) in msg
        assert "started" in msg and info.value.pid == proc.pid
        assert (run / LOCK_NAME).read_bytes() == before  # the refusal leaves the holder's lock alone


def test_second_train_and_resume_refused_by_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    with holder(run, tmp_path) as proc:
        for extra in ([], ["--resume"]):
            rc = main(["train", "--config", QUICK, "--variant", "smoke", "--out", str(run), "--quiet", "--no-plots",
                       *extra])
            err = capsys.readouterr().err
            assert rc == 2
            assert err.count("\n") == 1 and err.startswith("error: run directory") and f"pid {proc.pid}" in err
            assert "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written


def test_same_process_cannot_lock_twice(tmp_path):
    with RunLock(tmp_path / "run") as held:
        assert held.locked
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ------------------------------------------------------------------ stale locks

def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    with holder(run, tmp_path) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert read_lock(run)["pid"] == proc.pid  # SIGKILL left the file behind
    with RunLock(run) as lock:
        assert lock.took_over["pid"] == proc.pid and "not running" in lock.stale_reason
        assert read_lock(run)["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()


def test_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    run = tmp_path / "run"
    pid = _dead_pid()
    _write_lock(run, pid=pid, hostname=socket.gethostname(), start_time=time.time() - 60)
    with RunLock(run) as lock:
        assert lock.took_over["pid"] == pid
        assert read_lock(run) == lock.info and lock.info["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()
    assert not list(run.glob(".lock*"))  # no temp files left either


def test_lock_file_naming_this_process_but_not_held_is_taken_over(tmp_path):
    """A container restart gives the new run the dead run's pid: that lock is stale too."""
    run = tmp_path / "run"
    _write_lock(run, pid=os.getpid(), hostname=socket.gethostname(), start_time=time.time() - 60)
    with RunLock(run) as lock:
        assert "this process" in lock.stale_reason


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc for process start times")
def test_live_pid_is_respected_unless_it_is_younger_than_the_lock(tmp_path):
    run = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        host = socket.gethostname()
        _write_lock(run, pid=sleeper.pid, hostname=host, start_time=time.time() + 5)  # pid older: respected
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(run).acquire()
        _write_lock(run, pid=sleeper.pid, hostname=host, start_time=time.time() - 3600)  # pid reused since
        with RunLock(run) as lock:
            assert "started after the lock was written" in lock.stale_reason
    finally:
        _stop(sleeper)


def test_lock_from_another_host_is_refused(tmp_path):
    run = tmp_path / "run"
    p = _write_lock(run, pid=_dead_pid(), hostname="elsewhere.invalid", start_time=time.time())
    before = p.read_bytes()
    with pytest.raises(RunLockedError, match="elsewhere.invalid.*another host") as info:
        RunLock(run).acquire()
    assert str(p) in str(info.value)  # says which file to delete if that run is dead
    assert p.read_bytes() == before


def test_unreadable_lock_file_is_stale_only_once_old(tmp_path, monkeypatch):
    run = tmp_path / "run"
    p = _write_lock(run)
    p.write_bytes(b"\x00garbage")
    with monkeypatch.context() as m:
        m.setattr(lock_lib, "UNREADABLE_GRACE_S", 3600.0)
        m.setattr(lock_lib, "_ATTEMPTS", 3)
        with pytest.raises(RunLockedError, match="being written"):
            RunLock(run).acquire()  # young: it may be one being written right now
    assert p.read_bytes() == b"\x00garbage"
    written = p.stat().st_mtime
    with RunLock(run) as lock:  # waits out the grace period, then takes it over
        assert "unreadable" in lock.stale_reason
        assert time.time() - written >= lock_lib.UNREADABLE_GRACE_S


def test_racing_processes_take_over_a_stale_lock_exactly_once(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid(), hostname=socket.gethostname(), start_time=time.time() - 60)
    go = tmp_path / "go"
    logs = [tmp_path / f"racer{i}.log" for i in range(4)]
    procs = [_spawn(run, 2.0, str(go), log=log) for log in logs]
    try:
        deadline = time.time() + DEADLINE_S
        while not all(log.read_text().startswith("ready") for log in logs):  # every racer at the barrier
            assert time.time() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.02)
        go.touch()
        for proc in procs:
            proc.wait(timeout=DEADLINE_S)
    finally:
        for proc in procs:
            _stop(proc)
    outs = [log.read_text().removeprefix("ready\n").strip() for log in logs]
    won = [o for o in outs if o.startswith("won")]
    assert len(won) == 1, outs
    winner = won[0].split()[1]
    assert all(o.startswith("refused") and f"pid {winner}" in o for o in outs if not o.startswith("won")), outs
    assert not (run / LOCK_NAME).exists() and not list(run.glob(".lock*"))


def test_takeover_never_replaces_a_lock_taken_over_meanwhile(tmp_path, monkeypatch):
    """Deterministic interleaving: B takes over the stale lock between A opening it and A's flock."""
    import fcntl

    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid(), hostname=socket.gethostname(), start_time=time.time() - 60)
    a, b = RunLock(run), RunLock(run)
    real_flock, calls = fcntl.flock, []

    def interleaved(fd, op):
        if op & fcntl.LOCK_EX:
            calls.append(fd)
            if len(calls) == 1:  # A's flock of the stale .lock, after A opened it
                monkeypatch.setattr(fcntl, "flock", real_flock)
                b.acquire()
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", interleaved)
    try:
        with pytest.raises(RunLockedError):
            a.acquire()
        assert calls and b.took_over is not None and read_lock(run) == b.info  # B's lock is intact
    finally:
        b.release()
    assert not a.locked and not list(run.glob(".lock*"))


def test_without_hard_links_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    run = tmp_path / "run"
    with RunLock(run) as lock:
        assert read_lock(run) == lock.info
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()
    assert not list(run.glob(".lock*"))


# ------------------------------------------------------------------ run_experiment holds the lock

def test_run_experiment_holds_the_lock_and_releases_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}

    def body(cfg, out, **kwargs):
        seen["holder"] = read_lock(out)
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
        return {"ok": True}

    monkeypatch.setattr(driver_run, "_run_locked", body)
    assert driver_run.run_experiment(ExperimentConfig(), run, quiet=True) == {"ok": True}
    assert seen["holder"]["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize("exc", [ValueError("bad data"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_lock_released_after_an_exception_in_the_run(tmp_path, monkeypatch, exc):
    run = tmp_path / "run"

    def failing_setup(cfg, **kwargs):
        assert read_lock(run)["pid"] == os.getpid()
        raise exc

    monkeypatch.setattr(driver_run, "build_setup", failing_setup)
    with pytest.raises(type(exc)):
        driver_run.run_experiment(ExperimentConfig(), run, quiet=True)
    assert not (run / LOCK_NAME).exists()
    with RunLock(run) as lock:
        assert lock.took_over is None


def test_run_experiment_takes_over_a_stale_lock(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    pid = _dead_pid()
    _write_lock(run, pid=pid, hostname=socket.gethostname(), start_time=time.time() - 60)
    monkeypatch.setattr(driver_run, "_run_locked", lambda cfg, out, **kw: {"holder": read_lock(out)})
    assert driver_run.run_experiment(ExperimentConfig(), run)["holder"]["pid"] == os.getpid()
    assert f"took over the stale lock of {run} (pid {pid} is not running)" in capsys.readouterr().err


def test_stale_reason_rules():
    host = socket.gethostname()
    assert lock_lib.stale_reason(None, age_s=0.1) is None
    assert "unreadable" in lock_lib.stale_reason(None, age_s=60)
    assert lock_lib.stale_reason({"pid": _dead_pid(), "hostname": "elsewhere.invalid"}, age_s=60) is None
    assert "not running" in lock_lib.stale_reason({"pid": _dead_pid(), "hostname": host}, age_s=0)
    assert lock_lib.stale_reason({"pid": os.getppid(), "hostname": host, "start_time": time.time()}, age_s=0) is None
