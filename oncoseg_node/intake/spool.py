"""Durable instance store: bytes on disk before anyone is told Success.

Each instance is written to a temporary file in the spool's own filesystem,
fsynced, renamed into place and the directory fsynced, so after a crash a
file is either complete under its final name or absent (a leftover
temporary file is never mistaken for an instance). Names are generated here;
no received value (UID, patient name, ...) ever becomes part of a path.

The write and fsync of an instance run on a small writer pool while the
association thread validates and looks up the same instance, because the
fsync is the largest single cost of receiving and needs no Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from oncoseg_node.durable import (
    TMP_SUFFIX,
    copy_and_sync,
    fsync_dir,
    private_dir,
    temporary_name,
    write_and_sync,
)

# The receive path measures free space at most this often; in between, what
# this spool wrote since the last measure is subtracted, so the estimate errs
# low (other writers to the disk are seen at the next measure).
FREE_SPACE_MAX_AGE_S = 1.0


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed; ``relpath`` is relative to the spool root."""

    relpath: str
    sha256: str
    size: int


def sha256_of_region(source: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        fh.seek(offset)
        remaining = length
        while remaining:
            piece = fh.read(min(remaining, 1 << 20))
            if not piece:
                raise OSError(f"{source}: ended {remaining} bytes early")
            digest.update(piece)
            remaining -= len(piece)
    return digest.hexdigest()


class PendingWrite:
    """An instance being written; ``commit`` makes it visible, ``abort`` drops it."""

    def __init__(self, spool: Spool, final: Path, tmp: Path, future: Future[int],
                 size: int) -> None:
        self._spool = spool
        self._final = final
        self._tmp = tmp
        self._future = future
        self.size = size
        self.relpath = str(final.relative_to(spool.root))

    def commit(self, sha256: str) -> StoredFile:
        size = self._future.result()  # re-raises the writer's OSError
        self._spool.wrote(size)
        os.replace(self._tmp, self._final)
        fsync_dir(self._final.parent)
        return StoredFile(self.relpath, sha256, size)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the writer already removed its file
            self._future.result()
        self._tmp.unlink(missing_ok=True)


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
        return PendingWrite(self, final, tmp, self._pool.submit(write_and_sync, tmp, parts),
                            sum(len(p) for p in parts))

    def begin_copy(self, head: bytes, source: Path, offset: int, length: int) -> PendingWrite:
        """Start writing ``head`` and a region of ``source`` (an instance received to disk)."""
        final = self._new_path()
        tmp = temporary_name(final)
        return PendingWrite(self, final, tmp,
                            self._pool.submit(copy_and_sync, tmp, head, source, offset, length),
                            len(head) + length)

    def digest(self, source: Path, offset: int, length: int) -> Future[str]:
        """SHA-256 (hex) of a region of ``source``, computed on a writer thread.

        Read in 1 MiB pieces: a large instance is hashed without being held.
        """
        return self._pool.submit(sha256_of_region, source, offset, length)

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
