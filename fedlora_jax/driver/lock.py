"""One writer per run directory: ``<run>/.lock`` while a run writes to it.

``RunLock(run_dir)`` is a context manager. The OS lock is :class:`filelock.FileLock`
(``flock`` on ``.lock``), so a process that dies (even by SIGKILL) loses it with it; this
module only keeps the holder's record in the same file: JSON ``{pid, hostname, start_time}``,
written by filelock's ``on_acquired`` hook while the ``flock`` is held. Acquiring:

- ``.lock`` whose ``flock`` another process holds is refused with :class:`RunLockedError`
  (holder's pid, host and start time, read from the file);
- ``.lock`` we get the ``flock`` of is judged by the record in it before we write ours: empty
  (new, or its writer died before writing) is ours; one written on this host by a pid that is
  no longer alive (or now belongs to a younger process, or to this very process) is *stale*
  and taken over (``took_over`` / ``stale_reason``); one naming a live pid, or written on
  another host (its pid cannot be checked from here: the error says to delete the file if that
  run is dead), is respected: we let go of the ``flock`` and refuse, leaving the file as it
  was; an unparseable one is respected for ``UNREADABLE_GRACE_S``, then stale. Since only the
  ``flock`` holder reads and writes a record, of several processes racing for a stale lock
  exactly one wins.

Releasing (``__exit__``, also after an exception) unlinks ``.lock`` while still holding the
``flock`` (filelock would keep the file; a waiter that ``flock``-s the unlinked file is told so
by filelock and tries again), then releases it. A filesystem without ``flock`` is refused
(``OSError``) rather than locked by a weaker means.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import filelock

LOCK_NAME = ".lock"
#: A lock file that cannot be parsed is only judged stale once it is this old (seconds).
UNREADABLE_GRACE_S = 2.0
#: A pid whose process started this long (seconds) after the lock was written is a reused pid.
PID_REUSE_SLACK_S = 2.0
#: Retries while a lock changes hands (about 2.5 s in all: longer than the grace above).
_ATTEMPTS = 50
_RETRY_S = 0.05


class RunLockedError(RuntimeError):
    """The run directory is locked by another live run (``pid``, ``hostname``, ``start_time``)."""

    def __init__(self, run_dir: Path, info: dict | None, reason: str = ""):
        self.run_dir, self.info = Path(run_dir), info or {}
        self.pid, self.hostname = self.info.get("pid"), self.info.get("hostname")
        self.start_time = self.info.get("start_time")
        who = (f"pid {self.pid} on host {self.hostname!r} (started {_fmt_time(self.start_time)})"
               if self.pid is not None else "another process")
        super().__init__(f"run directory {str(self.run_dir)!r} is locked by {who}"
                         f"{': ' + reason if reason else ''}; wait for that run to finish or use another "
                         f"output directory (if it is dead, delete {str(self.run_dir / LOCK_NAME)!r})")


class _Respected(Exception):
    """Raised inside ``on_acquired``: the record in ``.lock`` is not stale (filelock lets go)."""

    def __init__(self, info: dict | None):
        super().__init__()
        self.info = info


def _fmt_time(t) -> str:
    if not isinstance(t, (int, float)):
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def read_lock(run_dir: str | Path) -> dict | None:
    """The holder info ``{pid, hostname, start_time}`` of ``run_dir``'s lock file, or ``None``
    when there is none or it cannot be parsed (it says nothing about whether it is stale)."""
    try:
        return _parse(Path(run_dir, LOCK_NAME).read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not isinstance(info.get("hostname"), str):
        return None
    return info


def _pid_state(pid: int) -> str:
    """``"dead"`` or ``"alive"`` (zombies are dead: they hold no locks)."""
    if pid <= 0:
        return "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # another user's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "alive"
    return "dead" if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X") else "alive"


def _process_start_time(pid: int) -> float | None:
    """Epoch seconds at which ``pid`` started (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def stale_reason(info: dict | None, *, age_s: float, hostname: str | None = None) -> str | None:
    """Why a lock nobody holds the OS lock of is stale, or ``None`` if it must be respected."""
    hostname = socket.gethostname() if hostname is None else hostname
    if info is None:
        return f"unreadable lock file ({age_s:.0f}s old)" if age_s >= UNREADABLE_GRACE_S else None
    if info["hostname"] != hostname:
        return None
    pid = info["pid"]
    if pid == os.getpid():
        return f"pid {pid} is this process, which does not hold it"
    if _pid_state(pid) == "dead":
        return f"pid {pid} is not running"
    started, lock_time = _process_start_time(pid), info.get("start_time")
    if started is not None and isinstance(lock_time, (int, float)) and started > lock_time + PID_REUSE_SLACK_S:
        return f"pid {pid} now belongs to a process started after the lock was written"
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """Exclusive lock of a run directory (see the module docstring).

    ``with RunLock(out) as lock: ...`` creates ``out`` if needed, acquires or raises
    :class:`RunLockedError`, and releases on exit. ``lock.took_over`` is the info of the stale
    lock it replaced (``None`` if it found none) and ``lock.stale_reason`` why it was stale.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.info: dict | None = None
        self.took_over: dict | None = None
        self.stale_reason: str | None = None
        self._flock: filelock.BaseFileLock | None = None
        self._fd: int | None = None  # filelock's descriptor, borrowed to unlink on release

    @property
    def locked(self) -> bool:
        return self._flock is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        if self._flock is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time()}
        refusal: RunLockedError | None = None
        for _ in range(_ATTEMPTS):
            status, refusal = self._attempt(info)
            if status == "ok":
                self.info = info
                return self
            if status == "refuse":
                raise refusal
            time.sleep(_RETRY_S)
        raise refusal or RunLockedError(self.run_dir, read_lock(self.run_dir), "could not acquire its lock file")

    def _attempt(self, info: dict) -> tuple[str, RunLockedError | None]:
        """One try: ``("ok", None)``, ``("refuse", error)``, or ``("retry", error)`` when the lock
        is changing hands (being written, or being taken over from a dead holder) right now."""
        here = socket.gethostname()

        def write_record(fd: int) -> None:  # filelock calls this with the flock held
            old, prev, reason = os.pread(fd, 1 << 16, 0), None, None
            if old:  # empty: created just now (by us, or by a writer we beat to the flock), or never written
                prev = _parse(old)
                reason = stale_reason(prev, age_s=time.time() - os.fstat(fd).st_mtime, hostname=here)
                if reason is None:
                    raise _Respected(prev)  # filelock lets go of the flock; the file is left as it was
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            if reason is not None:
                self.took_over, self.stale_reason = prev or {}, reason
            self._fd = fd

        lock = filelock.FileLock(self.path, mode=0o644, thread_local=False, blocking=False,
                                 fallback_to_soft=False, on_acquired=write_record)
        try:
            lock.acquire()
        except filelock.Timeout:  # another process holds the flock: its writer, or a taker-over
            held = read_lock(self.run_dir)
            changing = held is None or (held["hostname"] == here and held["pid"] != os.getpid()
                                        and _pid_state(held["pid"]) == "dead")
            return ("retry" if changing else "refuse"), RunLockedError(self.run_dir, held)
        except _Respected as kept:
            if kept.info is None:
                return "retry", RunLockedError(self.run_dir, None, "its lock file is being written")
            what = ("it was written on another host, so whether it is alive cannot be checked from here"
                    if kept.info["hostname"] != here else "")
            return "refuse", RunLockedError(self.run_dir, kept.info, what)
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                raise OSError(err.errno, f"cannot lock {self.path}: its filesystem does not support flock; "
                                         "use an output directory on a local filesystem") from err
            raise
        self._flock = lock
        return "ok", None

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the OS lock. Idempotent."""
        lock, fd = self._flock, self._fd
        self._flock = self._fd = None
        if lock is None:
            return
        try:
            if fd is not None and _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            lock.release()
