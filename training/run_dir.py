"""One run per run directory: a lock held for the whole run, and default run directories unique per run.

Two runs writing into one directory interleave metrics.jsonl, rotate each other's checkpoints away and leave
`.hydra/` describing one run and the checkpoints the other. So `train` takes an exclusive lock on
<run_dir>/train.lock before it writes anything (rank 0 holds it; every rank stops if it cannot be had):

    flock(LOCK_EX | LOCK_NB) on the file    the kernel releases it when the process dies, however it dies, so a
                                            lock is never held by a dead process
    the file's content                      who holds it (pid, host, start time, command line): the message of a
                                            second run names the holder, and a run that finds the content of a
                                            process that is gone takes the lock over with a warning naming it

The file is removed when the run ends. The default run directory (conf/train.yaml hydra.run.dir) ends in the
start time and the process id (resolver `${pid:}`), so two runs started in the same second get two directories.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from training.parallel import Runtime, all_reduce_sum

LOCK_FILE = "train.lock"
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # e.g. some NFS / Lustre mounts


class RunDirectoryLockedError(RuntimeError):
    """Another live run holds the run directory's lock."""


def register_resolvers() -> None:
    """`${pid:}`: this process's id, for run directories that must differ between runs started together."""
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()))


def describe(holder: dict[str, Any]) -> str:
    """"pid 123 on host h, started 2026-01-01T00:00:00Z (python train.py ...)" from a lock file's content."""
    if not holder:
        return "a process that has not written its details yet"
    command = f" ({' '.join(holder['argv'])})" if holder.get("argv") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}{command}"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": f"? (unreadable lock file content {text[:80]!r})"}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process exists (None: on another host, unknowable from here)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock on a run directory (see the module docstring). acquire() raises RunDirectoryLockedError
    naming the holder; release() removes the file."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        flock = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if not isinstance(error, BlockingIOError) and error.errno in UNSUPPORTED:
                    warnings.warn(f"{self.path}: this filesystem does not support flock ({error}); the run "
                                  "directory is protected only by the pid in it", RuntimeWarning, stacklevel=2)
                    flock = False
                    break
                if not isinstance(error, BlockingIOError):
                    raise
                holder = _read_holder(fd)
                for _ in range(20):  # the holder writes its details right after locking
                    if holder:
                        break
                    time.sleep(0.05)
                    holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryLockedError(
                    f"run directory {self.run_dir} is in use by {describe(holder)}: two runs cannot share a run "
                    f"directory (it holds {self.path}). Wait for that run to end, or choose another directory "
                    "(hydra.run.dir=... or trainer.run_dir=...)."
                ) from None
            try:  # a holder that was releasing may have removed the file we opened: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous and not flock and _alive(previous) is not False:  # no flock: only a dead pid is known stale
            os.close(fd)
            raise RunDirectoryLockedError(
                f"run directory {self.run_dir} is in use by {describe(previous)} (or was, if that process ended "
                f"on another host: then delete {self.path})"
            )
        if previous:
            state = {False: "is no longer running", None: "is gone (it no longer holds the lock)"}.get(
                _alive(previous), "no longer holds the lock")
            warnings.warn(f"{self.path}: taking over the stale lock of {describe(previous)}, which {state}",
                          RuntimeWarning, stacklevel=2)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter that opened it then sees a new file
        finally:
            os.close(self.fd)
            self.fd = None


def lock_run_directory(run_dir: str | Path, runtime: Runtime) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises RunDirectoryLockedError if it could not. Returns the
    lock on rank 0 (release it when the run ends), None on the other ranks."""
    lock, error = (RunLock(run_dir), None) if runtime.is_main else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunDirectoryLockedError as failure:
            error = failure
    if all_reduce_sum(float(error is not None), runtime) > 0:
        raise error or RunDirectoryLockedError(f"rank 0 could not lock the run directory {run_dir} (see its message)")
    return lock
