"""Durable instance store: bytes on disk before anyone is told Success.

Each instance is written to a temporary file in the spool's own filesystem,
fsynced, renamed into place and the directory fsynced, so after a crash a
file is either complete under its final name or absent (a leftover
temporary file is never mistaken for an instance). Names are generated here;
no received value (UID, patient name, ...) ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIX = ".partial"


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed; ``relpath`` is relative to the spool root."""

    relpath: str
    sha256: str
    size: int


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Spool:
    """Files of received instances under ``root/objects/<2 hex>/<32 hex>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)

    def store(self, data: bytes, sha256: str | None = None) -> StoredFile:
        """Durably store one encoded instance under a generated name.

        ``sha256`` may be passed when the caller already hashed ``data``.
        """
        name = secrets.token_hex(16)
        shard = self.objects / name[:2]
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            fsync_dir(self.objects)
        write_durably(shard / f"{name}.dcm", data)
        return StoredFile(
            relpath=f"objects/{name[:2]}/{name}.dcm",
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            size=len(data),
        )

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
        return shutil.disk_usage(self.root).free

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
