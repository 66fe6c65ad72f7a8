"""Crash-safe file writes shared by every stage that puts patient data on disk.

A file is written to a temporary name in its own folder, fsynced, renamed into
place and the folder fsynced, so after a crash it is either complete under its
final name or absent. The spool, the structure set writer and the QA snapshot
all write through here; it imports nothing of the project.

Everything the node writes holds patient data, so files are created 0600 and
folders 0700 whatever the umask the node was started with (an operator's
shell usually has 022, which would leave them world-readable).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

TMP_SUFFIX = ".partial"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """Create the folder ``path`` (parents as needed) for the node user only.

    A folder that exists already is made private too: one left by an older
    release, or created by hand, may be open to other users.
    """
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty if it is missing, and make it readable by the node user only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def sync_and_close(fd: int, tmp: Path) -> None:
    """fsync and close ``fd``, the new file ``tmp``; on any failure no file stays."""
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)


def _synced_new_file(tmp: Path, fill: Callable[[int], int]) -> int:
    """Create ``tmp``, let ``fill(fd)`` write it, fsync; on any failure no file stays."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        size = fill(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    sync_and_close(fd, tmp)
    return size


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def write_and_sync(tmp: Path, parts: Sequence[bytes]) -> int:
    """Write ``parts`` to a new file and fsync it; returns the byte count."""
    return _synced_new_file(tmp, lambda fd: sum(_write_all(fd, part) for part in parts))


def copy_and_sync(tmp: Path, head: bytes, source: Path, offset: int, length: int) -> int:
    """Write ``head`` then ``length`` bytes of ``source`` from ``offset`` to a new file; fsync.

    The copy runs in the kernel (``copy_file_range``, or ``sendfile`` where
    the two files' filesystems do not allow it), so a large instance never
    passes through the process's memory. Returns the byte count.
    """

    def fill(fd: int) -> int:
        size = _write_all(fd, head)
        with open(source, "rb") as src:
            copied = 0
            while copied < length:
                try:
                    step = os.copy_file_range(src.fileno(), fd, length - copied,
                                              offset + copied)
                except OSError:  # EXDEV, ENOSYS, EINVAL: a filesystem pair that cannot
                    step = os.sendfile(fd, src.fileno(), offset + copied, length - copied)
                if step == 0:
                    raise OSError(f"{source}: ended {length - copied} bytes early")
                copied += step
        return size + copied

    return _synced_new_file(tmp, fill)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename)."""
    tmp = temporary_name(path)
    write_and_sync(tmp, [data])
    try:
        os.replace(tmp, path)
    except BaseException:
        # e.g. ``path`` is a folder: the data never had a name, so neither
        # may its temporary file stay behind.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
