"""Hot reload of the protocols file: validated, swapped atomically, or refused.

watchdog reports edits to the file (editors write in place, or write a new
file and rename it over the old one: both are watched). A valid edit
replaces the protocol set in one assignment, so a job sees either the old or
the new set, never a mix; each job records the version it used. An invalid
edit changes nothing: the last good set keeps running and the problems are
logged. Whatever the file holds (bytes that are not UTF-8, binary, a
directory in its place, YAML that is not a mapping), the rejection is logged
and the watcher keeps watching: an exception escaping into watchdog's
observer thread would end it, and no later edit would ever be applied.
``last_rejection`` says why the file on disk is not the set in use, for
``/healthz``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from oncoseg_node.contouring.protocols import ProtocolSet, load_protocols
from oncoseg_node.errors import ConfigError

log = structlog.get_logger("oncoseg_node.contouring.protocols")


class ProtocolWatcher(FileSystemEventHandler):
    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self._current = load_protocols(self.path)  # invalid at start: the node does not start
        self._lock = threading.Lock()
        self._observer: Any = None
        self.last_rejection: str | None = None

    def current(self) -> ProtocolSet:
        return self._current

    def reload(self) -> bool:
        """Load the file again; True when a new version was swapped in."""
        with self._lock:
            try:
                candidate = load_protocols(self.path)
            except ConfigError as exc:
                self.last_rejection = f"{len(exc.problems)} problem(s) in {self.path}"
                log.error("protocols_reload_rejected", path=str(self.path),
                          problems=exc.problems, kept_version=self._current.version)
                return False
            except FileNotFoundError as exc:  # mid-rename: the next event retries
                log.warning("protocols_reload_unreadable", path=str(self.path), error=str(exc))
                return False
            except Exception as exc:  # anything else: rejected, and the watcher lives on
                self.last_rejection = f"{self.path}: {type(exc).__name__}: {exc}"
                log.error("protocols_reload_rejected", path=str(self.path),
                          problems=[f"{type(exc).__name__}: {exc}"],
                          kept_version=self._current.version)
                return False
            self.last_rejection = None
            if candidate.version == self._current.version:
                return False
            previous, self._current = self._current.version, candidate
            log.info("protocols_reloaded", path=str(self.path), version=candidate.version,
                     previous_version=previous, audit=True)
            return True

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            paths = {getattr(event, "src_path", ""), getattr(event, "dest_path", "")}
            if any(p and Path(os.fsdecode(p)).resolve() == self.path for p in paths):
                self.reload()
        except Exception:  # never let an exception end the observer thread
            log.exception("protocols_watch_event_failed")

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> None:
        self._observer = Observer()
        self._observer.schedule(self, str(self.path.parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
