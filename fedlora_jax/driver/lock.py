"""One writer per run directory: ``<run>/.lock`` while a run writes to it.

``RunLock(run_dir)`` is a context manager. The lock file holds JSON ``{pid, hostname,
start_time}`` and its holder keeps an ``fcntl.flock`` on it for as long as it runs, so a
process that dies (even by SIGKILL) loses the OS lock with it; the file it leaves behind is
*stale*. Acquiring:

- the lock file is written complete (pid, host, time) and ``flock``-ed under a unique temp
  name (``O_CREAT | O_EXCL``), then hard-linked to ``.lock``: the link fails if a lock
  exists, so two processes never both create one, and no reader ever sees a half-written
  lock (where hard links are not supported, ``.lock`` itself is created with ``O_EXCL``);
- an existing lock whose ``flock`` is held is refused with :class:`RunLockedError` (holder's
  pid, host and start time);
- an existing lock nobody ``flock``-s, written on this host by a pid that is no longer alive
  (or now belongs to a younger process, or to this very process), is stale: it is taken over
  by ``os.replace``-ing it with a new complete lock while holding the old one's ``flock``
  (so of several processes racing for a stale lock exactly one wins). A lock written on
  another host is never taken over (its pid cannot be checked from here): the error says to
  delete the file if that run is dead.

Releasing (``__exit__``, also after an exception) unlinks ``.lock`` while still holding the
``flock``, then closes it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid check alone decides
    fcntl = None

LOCK_NAME = ".lock"
#: A lock file that cannot be parsed is only judged stale once it is this old (seconds): it may
#: be one being written right now by the ``O_EXCL`` fallback.
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


def _flock(fd: int) -> bool | None:
    """Try to take the exclusive OS lock: True, False (held elsewhere), None (unsupported here)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # e.g. ENOLCK / EOPNOTSUPP: a filesystem without flock


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
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time()}
        refusal: RunLockedError | None = None
        for _ in range(_ATTEMPTS):
            tmp, fd = self._write_temp(info)
            try:
                if self._publish(tmp, fd):
                    status = "ok"
                else:
                    status, refusal = self._try_take_over(tmp, fd)
                if status == "ok":
                    self.info, self._fd, fd = info, fd, None
                    return self
            finally:
                if fd is not None:
                    os.close(fd)
                tmp.unlink(missing_ok=True)  # after a link, .lock keeps the file; after a replace, gone
            if status == "refuse":
                raise refusal
            time.sleep(_RETRY_S)
        raise refusal or RunLockedError(self.run_dir, read_lock(self.run_dir), "could not acquire its lock file")

    def _write_temp(self, info: dict) -> tuple[Path, int]:
        """A complete, flock-ed lock file under a unique temp name in the run directory."""
        tmp = self.run_dir / f"{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            _flock(fd)  # our own new file: nobody else can hold it
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, fd

    def _publish(self, tmp: Path, fd: int) -> bool:
        """Make ``tmp`` the lock if there is none (True), False if a lock file exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
        # No hard links here: create .lock itself exclusively (it is briefly empty).
        try:
            lfd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(lfd, os.pread(fd, 1 << 16, 0))
            os.fsync(lfd)
            for _ in range(_ATTEMPTS):  # a reader may hold the flock for an instant
                if _flock(lfd) is not False:
                    break
                time.sleep(_RETRY_S)
            os.dup2(lfd, fd)
        finally:
            os.close(lfd)
        return True

    def _try_take_over(self, tmp: Path, fd: int) -> tuple[str, RunLockedError | None]:
        """Replace a stale ``.lock`` with ``tmp``: ``("ok", None)``, ``("refuse", error)``, or
        ``("retry", error)`` when the lock is changing hands right now."""
        try:
            old = os.open(self.path, os.O_RDONLY)  # flock needs no write access
        except FileNotFoundError:
            return "retry", None  # released meanwhile
        try:
            got = _flock(old)
            info = _parse(os.pread(old, 1 << 16, 0))
            if not _same_file(old, self.path):
                return "retry", RunLockedError(self.run_dir, info)  # released or replaced meanwhile
            if got is False:
                # Held: by its writer, or (if that writer is dead) by someone taking it over right now.
                changing = info is None or (info["hostname"] == socket.gethostname() and info["pid"] != os.getpid()
                                            and _pid_state(info["pid"]) == "dead")
                return ("retry" if changing else "refuse"), RunLockedError(self.run_dir, info)
            reason = stale_reason(info, age_s=time.time() - os.fstat(old).st_mtime)
            if reason is None:
                if info is None:
                    return "retry", RunLockedError(self.run_dir, None, "its lock file is being written")
                what = ("it was written on another host, so whether it is alive cannot be checked from here"
                        if info["hostname"] != socket.gethostname() else "")
                return "refuse", RunLockedError(self.run_dir, info, what)
            # We hold the old lock's flock and it is still the one at .lock: nobody else can
            # replace it until we let go of it, so this replace cannot clobber a live lock.
            os.replace(tmp, self.path)
            self.took_over, self.stale_reason = info or {}, reason
            return "ok", None
        finally:
            os.close(old)

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the OS lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
