"""One node per state directory: an exclusive ``flock`` on ``STATE_DIR/node.lock``.

Two nodes on one ledger would each requeue the other's running job and
deliver it twice, so the lock is taken before anything else in the state
directory is opened or changed, and held until the process exits (the
kernel drops it even after kill -9, so a stale lock never blocks a
restart). The file holds the holder's PID, for the refusal message and for
the CLI, which tells an operator whether a running node will pick up a
change made in the ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from oncoseg_node.errors import StartupError

LOCK_NAME = "node.lock"
STATE_DIR_MODE = 0o700  # the state directory holds patient data
LOCK_FILE_MODE = 0o600


def lock_path(state_dir: Path) -> Path:
    return Path(state_dir) / LOCK_NAME


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class StateLock:
    """The exclusive lock on a state directory, held by the running node."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = lock_path(self.state_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StartupError` naming the directory and holder."""
        self.state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise in_use(self.state_dir, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def in_use(state_dir: Path, pid: int | None) -> StartupError:
    holder = f"PID {pid}" if pid is not None and pid > 0 else "a process that wrote no PID yet"
    return StartupError(f"state directory {state_dir} is in use by another node ({holder}); "
                        "stop that node or give this one its own state_dir")


def refuse_if_held(state_dir: Path) -> None:
    """Raise at once when another node holds ``state_dir``; creates nothing.

    The first thing ``run`` does after reading its config: a second node is
    refused before it spends time validating protocols or importing the stages.
    """
    pid = holder_pid(state_dir)
    if pid is not None:
        raise in_use(Path(state_dir), pid)


def holder_pid(state_dir: Path) -> int | None:
    """PID of the node holding ``state_dir``'s lock, or None when no node runs there.

    Reads without creating anything: the CLI must not leave files behind.
    """
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1  # held; -1 when the PID is not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
