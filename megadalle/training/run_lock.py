"""One writer per run folder and stage: an advisory lock that rank 0 holds for the whole run.

Two `megadalle train` processes on one run folder would otherwise resume from each other's
checkpoints and delete each other's saves. The lock is `fcntl.flock` on `<stage>/.lock`: the
kernel releases it when the holder exits in any way (SIGKILL included), so a lock left by a dead
process is never an obstacle, and it works across hosts on file systems that implement flock
(NFSv4, Lustre mounted with `flock`). The file's contents say who holds it (pid, host, start time,
command line), for the message a second writer gets, and for the note that a dead holder's lock
was taken over.

Where the file system does not implement locks (ENOLCK, EOPNOTSUPP) the run goes on with a
warning: refusing to train there would be worse than the risk the lock removes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from megadalle.errors import CommandError

log = logging.getLogger("megadalle.training")

LOCK_NAME = ".lock"


class RunFolderBusy(CommandError):
    """Another live process holds this run folder's lock."""


def describe_holder(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')}, started {started}"


def folder_error(path: Path, e: OSError, what: str) -> CommandError:
    """A one-line error for an OS failure on a run folder: what failed, where, and what to change."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    hint = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there (disk quota exceeded)",
            errno.EROFS: "the file system is read-only; set logging.run_dir to a writable folder",
            errno.EACCES: "set logging.run_dir to a folder you may write to",
            errno.EPERM: "set logging.run_dir to a folder you may write to",
            errno.ENOTDIR: "a part of that path is a file, not a folder; set logging.run_dir elsewhere",
            errno.EEXIST: "a file of that name is in the way; set logging.run_dir elsewhere"}
    return CommandError(f"cannot {what} {path}: {reason}; {hint.get(e.errno, 'check the path and the disk')}")


class RunLock:
    """`with RunLock(stage_folder):` or acquire()/release(); only rank 0 takes it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict | None = None  # the info a dead holder left, if any

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise folder_error(self.folder, e, "create the run folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = self._read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = describe_holder(info) if info else "another process"
                raise RunFolderBusy(f"{self.folder} is in use by {holder} (lock {self.path}); wait for that run "
                                    f"to end, stop it, or use another logging.run_dir") from None
            log.warning("%s: file locks are not supported here (%s); two runs on this folder would not be "
                        "stopped from overwriting each other", self.folder, os.strerror(e.errno or 0))
            return self
        self.previous = self._read(fd) or None
        if self.previous:
            log.warning("%s: took over the lock left by %s, which has ended", self.folder,
                        describe_holder(self.previous))
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(mine).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise folder_error(self.path, e, "write the lock file") from None
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 65536, 0)
            info = json.loads(data.decode("utf-8")) if data.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to report
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __del__(self) -> None:  # a trainer dropped without train()/close() frees its folder
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
