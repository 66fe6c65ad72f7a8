"""Wake-ups for an association's two pynetdicom threads, instead of millisecond polls.

pynetdicom runs each association on two threads that poll each other:

- the upper layer (DUL) thread checks its socket and its outgoing queue in a
  loop that sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing;
- the association thread sleeps 1 ms, then checks for a decoded DIMSE
  message, a release or an abort, over and over.

At a few hundred instances a second those sleeps are a large part of each
instance's time (a decoded C-STORE waits for the next poll, so does its
response), and the polls cost CPU while nothing happens. Here both threads
block on what they wait for, through the objects pynetdicom hands them:

- the DUL thread blocks in :attr:`~oncoseg_node.intake.wire.BoundedSocket.ready`,
  which polls the socket and an eventfd; :class:`ProviderQueue` (the DUL's
  outgoing queue) writes to that eventfd on every ``put``, so a response is
  sent the moment it is queued;
- the association thread blocks in its non-blocking read of the DIMSE
  message queue (:class:`MessageQueue`) until a message, a release or abort
  primitive (:class:`UserQueue`) arrives, or :data:`REACTOR_WAIT_S` passes,
  after which its own checks (timeouts, a dead DUL thread) run as before.

- the association thread's own 1 ms sleep at the top of each pass is
  skipped right after it served a message (:class:`WakingAssociation`): the
  sender's next request usually arrives within that millisecond.

Timers and shutdown keep a resolution of :data:`REACTOR_WAIT_S`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom.association import Association

log = structlog.get_logger("oncoseg_node.receiver")

# The longest either thread blocks before running its periodic checks (the
# ARTIM and network-idle timers, a peer that vanished): well inside any
# timeout a DICOM peer would notice.
REACTOR_WAIT_S = 0.05
# pynetdicom's sleep between passes of the association loop.
IDLE_PASS_SLEEP_S = 0.001


class Wakeup:
    """An eventfd the DUL thread polls beside its socket.

    Writes and the close hold one lock: a descriptor number freed by the
    close may be reused at once by another thread's open (a spool file), and
    a late ``notify`` must never write into that.
    """

    def __init__(self) -> None:
        self.fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):  # nothing to drain
            if self.fd is not None:
                os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, None
            if fd is not None:
                os.close(fd)


class ProviderQueue(queue.Queue):
    """The DUL's outgoing queue: every ``put`` wakes the DUL thread's poll."""

    def __init__(self, wakeup: Wakeup) -> None:
        super().__init__()
        self.wakeup = wakeup

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wakeup.notify()


class UserQueue(queue.Queue):
    """The DUL's queue to the association thread: every ``put`` wakes that thread."""

    def __init__(self, arrived: threading.Event) -> None:
        super().__init__()
        self.arrived = arrived

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.arrived.set()


class MessageQueue(UserQueue):
    """The DIMSE message queue; a non-blocking ``get`` waits for anything to act on.

    pynetdicom's association loop asks it without blocking, then checks the
    DUL's user queue for a release or abort. Here that ``get`` first waits
    (at most :data:`REACTOR_WAIT_S`) until either queue has an item, so the
    loop runs when there is something to do rather than every millisecond.
    A blocking ``get`` behaves as :class:`queue.Queue`'s.
    """

    def __init__(self, arrived: threading.Event, user_queue: queue.Queue) -> None:
        super().__init__(arrived)
        self.user_queue = user_queue

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            return super().get(block, timeout)
        if not self.queue:
            # Cleared before looking, so an item put after the look sets it again.
            self.arrived.clear()
            if not self.queue and not self.user_queue.queue:
                self.arrived.wait(REACTOR_WAIT_S)
        return super().get(block=False)


def install(assoc: Any, wakeup: Wakeup) -> None:
    """Give a new acceptor association the waking queues (before its threads start).

    Items already queued (none, for a connection just accepted) move over.
    """
    dul = assoc.dul
    arrived = threading.Event()
    provider, user = ProviderQueue(wakeup), UserQueue(arrived)
    messages = MessageQueue(arrived, user)
    for old, new in ((dul.to_provider_queue, provider), (dul.to_user_queue, user),
                     (assoc.dimse.msg_queue, messages)):
        while True:
            try:
                new.put(old.get(block=False))
            except queue.Empty:
                break
    dul.to_provider_queue = provider
    dul.to_user_queue = user
    assoc.dimse.msg_queue = messages
    assoc.__class__ = WakingAssociation
    # The DUL thread now blocks in the socket's ``ready``; its own sleep after
    # an idle pass would only delay the response the wake-up announced.
    dul._run_loop_delay = 0


class WakingAssociation(Association):
    """An acceptor association whose loop goes straight back to its queue after a message.

    pynetdicom's ``_run_reactor`` with one change: the sleep at the top of
    a pass is skipped when the pass before served a message. A pass that
    found nothing still sleeps, so a primitive the loop never consumes
    cannot make it spin.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                time.sleep(IDLE_PASS_SLEEP_S)
            # Paused while this association itself sends (see pynetdicom).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("association_network_timeout", timeout_s=self.network_timeout)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
