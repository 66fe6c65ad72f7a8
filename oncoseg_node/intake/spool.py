"""Durable instance store: bytes on disk before anyone is told Success.

Each instance is written to a temporary file in the spool's own filesystem,
fsynced, renamed into place and the directory fsynced, so after a crash a
file is either complete under its final name or absent (a leftover
temporary file is never mistaken for an instance). Names are generated here;
no received value (UID, patient name, ...) ever becomes part of a path.

A received instance is written by :class:`IncomingFile` as its fragments
arrive (see ``streaming``): the node's file meta, then the data set exactly
as sent, hashed on the way, so its bytes are copied once, from the received
PDU to the file. Its fsync starts on a small writer pool the moment the last
fragment is written, while the association thread validates and looks up the
same instance, because the fsync is the largest single cost of receiving and
needs no Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from oncoseg_node.durable import (
    PRIVATE_FILE,
    TMP_SUFFIX,
    fsync_dir,
    private_dir,
    sync_and_close,
    temporary_name,
    write_and_sync,
)

# The receive path measures free space at most this often; in between, what
# this spool wrote since the last measure is subtracted, so the estimate errs
# low (other writers to the disk are seen at the next measure).
FREE_SPACE_MAX_AGE_S = 1.0
# The first bytes of each received data set are also kept in memory, for the
# header parse: a CT slice up to 512 x 1024 is parsed without reading its file
# back; a larger data set's header is read from its file.
HEAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed; ``relpath`` is relative to the spool root."""

    relpath: str
    sha256: str
    size: int


class PendingWrite:
    """An instance being written; ``commit`` makes it visible, ``abort`` drops it.

    ``finish`` completes the file (waits for or runs its fsync; returns its
    size, raises its OSError); ``drop`` ends the write without keeping it.
    """

    def __init__(self, spool: Spool, final: Path, tmp: Path, finish: Callable[[], int],
                 drop: Callable[[], None], size: int) -> None:
        self._spool = spool
        self._final = final
        self._tmp = tmp
        self._finish = finish
        self._drop = drop
        self.size = size
        self.relpath = str(final.relative_to(spool.root))
        self._committed = False

    def commit(self, sha256: str) -> StoredFile:
        size = self._finish()
        self._spool.wrote(size)
        os.replace(self._tmp, self._final)
        self._committed = True
        fsync_dir(self._final.parent)
        return StoredFile(self.relpath, sha256, size)

    def abort(self) -> None:
        """Drop the file unless it was committed (so callers may always call this)."""
        if self._committed:
            return
        self._drop()
        self._tmp.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_and_close(fd: int, tmp: Path, size: int) -> int:
    """The writer's part of an :class:`IncomingFile`: fsync, close; no file stays on failure."""
    sync_and_close(fd, tmp)
    return size


class IncomingFile:
    """One instance's spool file, written as its data set arrives.

    Created when the C-STORE request's command is complete, with the node's
    file meta; :meth:`write` appends each data fragment (and hashes it);
    :meth:`finish` starts the fsync on a writer; :meth:`pending` then gives
    the :class:`PendingWrite` the handler commits or aborts. A write that
    fails (disk full) is kept in :attr:`error` and later fragments are
    dropped, so the handler can refuse the instance; :meth:`discard` drops
    an instance whose association ended before it was handled. Writes come
    from the connection's thread, a discard may come from another: one lock.
    """

    def __init__(self, spool: Spool, meta: bytes | None) -> None:
        self._spool = spool
        self.final = spool._new_path()
        self.tmp = temporary_name(self.final)
        self.meta_length = len(meta or b"")
        self.length = 0  # data set bytes written
        self.head = bytearray()  # the data set's first HEAD_BYTES
        self.error: OSError | None = None
        self._hash = hashlib.sha256()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._future: Future[int] | None = None
        self._discarded = False
        self._complete = False
        if meta is None:  # nothing to write it under: the data set is dropped as it arrives
            self.error = OSError("the command's UIDs cannot be encoded in a file meta")
            return
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               PRIVATE_FILE)
            _write_all(self._fd, meta)
        except OSError as exc:
            self._fail(exc)

    def write(self, data: memoryview) -> None:
        with self._lock:
            if self._fd is None:  # failed or discarded: the rest is not kept
                return
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                self._fail(exc)
                return
            self._hash.update(data)
            self.length += len(data)
            if len(self.head) < HEAD_BYTES:
                self.head += data[:HEAD_BYTES - len(self.head)]

    def finish(self) -> None:
        """The data set is complete: its fsync starts on a writer."""
        with self._lock:
            if self._fd is None:
                return
            self._complete = True
            fd, self._fd = self._fd, None
            self._future = self._spool._pool.submit(_sync_and_close, fd, self.tmp,
                                                    self.meta_length + self.length)

    def _sync(self) -> int:
        """Wait for the fsync :meth:`finish` started; the file's size."""
        assert self._future is not None  # pending() is given out only once finished
        return self._future.result()

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the data set as sent (not of the file meta)."""
        return self._hash.hexdigest()

    @property
    def whole_in_head(self) -> bool:
        return self.length <= len(self.head)

    def pending(self) -> PendingWrite:
        """The finished file to commit or abort; raises the write's error if it failed."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._discarded or not self._complete:
                raise OSError(f"{self.tmp.name}: data set incomplete")
            return PendingWrite(self._spool, self.final, self.tmp, self._sync, self.discard,
                                self.meta_length + self.length)

    def discard(self) -> None:
        """Drop the file (its association ended before the instance was handled)."""
        with self._lock:
            self._discarded = True
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            future = self._future
        if future is not None:
            with contextlib.suppress(OSError):
                future.result()
        self.tmp.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> None:
        """Keep the error, close and remove the file (called holding the lock, or in init)."""
        self.error = exc
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


class Spool:
    """Files of received instances under ``root/objects/<2 hex>/<32 hex>.dcm``."""

    def __init__(self, root: Path, writers: int = 4) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        private_dir(self.root)
        private_dir(self.objects)
        # All 256 shards exist up front, so no instance pays for creating one.
        shards = [self.objects / f"{i:02x}" for i in range(256)]
        missing = [d for d in shards if not d.is_dir()]
        for shard in shards:
            private_dir(shard)
        if missing:
            fsync_dir(self.objects)
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="spool-writer")
        self._free_lock = threading.Lock()
        self._free_measured = 0
        self._free_measured_at = -FREE_SPACE_MAX_AGE_S
        self._written_since = 0

    def _new_path(self) -> Path:
        name = secrets.token_hex(16)
        return self.objects / name[:2] / f"{name}.dcm"

    def begin(self, parts: Sequence[bytes]) -> PendingWrite:
        """Start writing one encoded instance (given in parts) under a generated name."""
        final = self._new_path()
        tmp = temporary_name(final)
        future = self._pool.submit(write_and_sync, tmp, parts)

        def drop() -> None:
            with contextlib.suppress(OSError):  # the writer already removed its file
                future.result()

        return PendingWrite(self, final, tmp, future.result, drop, sum(len(p) for p in parts))

    def incoming(self, meta: bytes | None) -> IncomingFile:
        """Start the file of an instance arriving now, with ``meta`` (its file meta) first.

        With ``meta`` None nothing is written and the instance is refused later.
        """
        return IncomingFile(self, meta)

    def store(self, data: bytes) -> StoredFile:
        """Durably store one encoded instance and wait for it."""
        return self.begin([data]).commit(hashlib.sha256(data).hexdigest())

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses anything outside the spool."""
        candidate = (self.root / relpath).resolve()
        if self.root.resolve() not in candidate.parents:
            raise ValueError(f"{relpath!r} is outside the spool")
        return candidate

    def remove(self, relpath: str) -> None:
        path = self.path(relpath)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def free_bytes(self) -> int:
        """Free bytes on the spool's filesystem, measured now."""
        free = shutil.disk_usage(self.root).free
        with self._free_lock:
            self._free_measured, self._written_since = free, 0
            self._free_measured_at = time.monotonic()
        return free

    def free_bytes_recent(self) -> int:
        """Free bytes as of at most :data:`FREE_SPACE_MAX_AGE_S` ago, less what was written since.

        For the per-instance check; a caller about to refuse asks
        :meth:`free_bytes` again, so a refusal always rests on a fresh figure.
        """
        with self._free_lock:
            if time.monotonic() - self._free_measured_at < FREE_SPACE_MAX_AGE_S:
                return self._free_measured - self._written_since
        return self.free_bytes()

    def wrote(self, size: int) -> None:
        """Count ``size`` bytes written since the last free-space measure."""
        with self._free_lock:
            self._written_since += size

    def clean_partials(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        removed = 0
        for tmp in self.objects.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def all_relpaths(self) -> set[str]:
        return {
            str(p.relative_to(self.root))
            for p in self.objects.rglob("*.dcm")
            if not p.name.startswith(".")
        }
