"""A doorbell for the node's worker loops: woken at once when there is work.

The assembler and the worker used to look for work on a short timer; each
now sleeps until rung (a job was created, an association ended, the node
is stopping) or until its own next deadline, so a series moves on the moment
it can and an idle node does not spin.
"""

from __future__ import annotations

import threading


class Doorbell:
    def __init__(self) -> None:
        self._rung = threading.Event()

    def ring(self, *_: object) -> None:
        """Wake the waiting loop (extra arguments let it serve as any callback)."""
        self._rung.set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep until rung or ``timeout_s``; True when rung. A ring while awake is kept."""
        rung = self._rung.wait(max(timeout_s, 0.0))
        self._rung.clear()
        return rung
