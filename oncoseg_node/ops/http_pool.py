"""An ``http.server`` that serves on a fixed pool of threads, with a deadline per request.

The standard ``ThreadingHTTPServer`` starts one thread per connection and
never times a connection out, so a few hundred slow or idle clients (a
scanner probing the port, a misconfigured monitor, a slowloris) hold a few
hundred threads for ever. Here:

- requests run on ``threads`` pool threads; at most ``threads + backlog``
  connections are open at once, and one beyond that is closed at accept,
  never queued without bound;
- every connection has a deadline: ``timeout_s`` to send a request (from
  accept, or from the end of the previous response on a keep-alive
  connection) and to take the response. A socket timeout alone is per
  ``recv``, so a client sending a byte every few seconds would never hit
  it; one reaper thread instead shuts down each socket past its deadline,
  which ends the blocked read at once and frees the pool thread.

With ``tls`` set, each connection's TLS handshake runs on its pool thread
under the same deadline, so a client that stalls mid-handshake holds one
slot until its deadline and never the accept loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer
from typing import Any

import structlog

from oncoseg_node.ops.web_tls import ServerTls

log = structlog.get_logger("oncoseg_node.ops.http")


class PooledHTTPServer(HTTPServer):
    """HTTPServer with a bounded pool of request threads and per-connection deadlines."""

    daemon_threads = True
    # The kernel's accept queue: the stdlib's 5 makes a burst of connections wait
    # for SYN retransmits (a second each) before the accept loop even sees them.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any, *, threads: int,
                 timeout_s: float, backlog: int | None = None) -> None:
        self.timeout_s = timeout_s
        self.tls: ServerTls | None = None
        self.refused = 0  # connections closed at accept because every slot was taken
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="http")
        self._slots = threading.BoundedSemaphore(threads + (backlog if backlog is not None
                                                            else 4 * threads))
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, handler)
        self._reaper = threading.Thread(target=self._reap, name="http-reaper", daemon=True)
        self._reaper.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("http_connections_refused", total=self.refused,
                            client=client_address[0])
            self.shutdown_request(request)
            return
        request.settimeout(self.timeout_s)  # and a per-recv bound for writes to a stuck peer
        self.extend_deadline(request)
        try:
            self._pool.submit(self._serve, request, client_address)
        except RuntimeError:  # pool shut down: the server is closing
            self._forget(request)
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request = self._start_tls(request)
                request.do_handshake()
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._forget(request)
            self.shutdown_request(request)

    def _start_tls(self, request: socket.socket) -> Any:
        """The TLS socket that takes over ``request``'s descriptor, and its deadline."""
        assert self.tls is not None
        tls_socket = self.tls.wrap(request)
        with self._deadlines_lock:
            self._deadlines[tls_socket] = self._deadlines.pop(request)
        return tls_socket

    def extend_deadline(self, request: socket.socket) -> None:
        """Give the connection ``timeout_s`` from now (at accept and after each response)."""
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + self.timeout_s

    def _forget(self, request: socket.socket) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def _reap(self) -> None:
        tick = min(max(self.timeout_s / 4, 0.05), 1.0)
        while not self._closing.wait(tick):
            now = time.monotonic()
            with self._deadlines_lock:
                overdue = [s for s, deadline in self._deadlines.items() if deadline <= now]
            for sock in overdue:
                # Ends a read blocked in another thread; that thread then closes the socket.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone mid-answer (or cut at its deadline) is routine, not a traceback.
        log.debug("http_connection_error", client=client_address[0], exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._deadlines_lock:
            open_now = list(self._deadlines)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
