"""One live run per run folder: ``<run>/run.lock`` names its owner (pid, host, command) and the owner holds an
exclusive ``flock`` on it while it runs.

The kernel drops an ``flock`` when its process dies, however it dies, so a lock file left by a killed run is
taken over without guessing from its pid (which the system may have given to another process since). Where
the filesystem has no ``flock`` (some network filesystems), the pid decides: a lock of this host whose pid is
gone is stale; one of another host is held, since its pid cannot be checked from here. A SLURM job requeued
after preemption (same job id, maybe another node) takes over the lock of its previous incarnation, which
SLURM has ended, even before a network filesystem notices that node's lock is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from step_lightning.core.errors import ConfigError

LOCK_NAME = "run.lock"
# flock is unsupported on this filesystem: these errnos, not a lock held by another process.
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# A dead owner's flock can outlive it for a few seconds: its data-loader workers (forked, so sharing the lock)
# notice the parent is gone within torch's 5 s status check.
STALE_WAIT_S = 12.0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def alive_here(owner: dict) -> bool | None:
    """Whether the owner's process runs; None when it ran on another host (its pid means nothing here)."""
    if owner.get("host") != socket.gethostname():
        return None
    return process_alive(int(owner.get("pid", 0)))


def slurm_incarnation() -> tuple[str | None, int]:
    """(SLURM job id, times it was requeued) of this process; (None, 0) outside SLURM."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def earlier_incarnation(owner: dict) -> bool:
    """The owner is this SLURM job before it was requeued: SLURM ended it before starting this one."""
    job, restarts = slurm_incarnation()
    return job is not None and owner.get("slurm_job") == job and int(owner.get("slurm_restarts") or 0) < restarts


def owner_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def held_message(folder: Path, owner: dict) -> str:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
    if alive_here(owner) is False:
        who = f"a process left by {who}, which has ended (a data-loader worker?)"
    command = f" ({owner['command']})" if owner.get("command") else ""
    return (
        f"{folder} is in use by a live run, {who}{command}; wait for it to end or give this run another folder "
        f"(hydra.run.dir=...). If that run is gone, delete {folder / LOCK_NAME}."
    )


def try_lock(fd: int, path: Path) -> bool:
    """Lock the open lock file ``fd`` (of ``path``) for this process; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
    owner = owner_record(path)  # no flock here: the pid and host decide
    return not owner or owner.get("pid") == os.getpid() or alive_here(owner) is False or earlier_incarnation(owner)


class RunFolderLock:
    """Taken with ``acquire`` (raises ConfigError naming the live owner), given back with ``release``."""

    def __init__(self, folder: str | Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.took_over: dict | None = None  # the record of the dead run whose lock this one took over

    def record(self) -> dict:
        job, restarts = slurm_incarnation()
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": job, "slurm_restarts": restarts,
                "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + STALE_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = try_lock(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                owner = owner_record(self.path)
                if earlier_incarnation(owner) and self._same_file(fd):  # its lock is on a node SLURM took away
                    self.path.unlink(missing_ok=True)
                    os.close(fd)
                    self.took_over = owner
                    continue
                os.close(fd)
                # Its owner is still writing its record, or has died and leaves the lock in a moment.
                if time.monotonic() < deadline and (not owner or alive_here(owner) is False):
                    time.sleep(0.1)
                    continue
                raise ConfigError(held_message(self.folder, owner))
            if not self._same_file(fd):  # released (unlinked) between our open and our lock: lock the new one
                os.close(fd)
                continue
            previous = owner_record(self.path)
            if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
                self.took_over = previous
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.record()).encode())
            os.fsync(fd)
            self.fd = fd
            return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        if self._same_file(self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_folder_free(folder: str | Path) -> None:
    """Raise ConfigError when a live run holds ``folder``; takes nothing (a check before Hydra writes there)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        held = not try_lock(fd, path)
    finally:
        os.close(fd)  # drops the probe's flock, if it got one
    if held:
        owner = owner_record(path)
        raise ConfigError(held_message(Path(folder), owner))
