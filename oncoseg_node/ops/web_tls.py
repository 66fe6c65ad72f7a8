"""HTTPS for the node's HTTP port: TLS 1.2 and newer, the site's certificate, reloaded on SIGHUP.

The handshake runs on the pool thread that serves the connection, under the
connection's deadline (:mod:`oncoseg_node.ops.http_pool`), never on the
accept loop. A renewed certificate is picked up by ``reload()`` (the node
calls it on SIGHUP): new connections get the new context, connections open
keep theirs, and a reload that fails keeps the old one and says why.
"""

from __future__ import annotations

import socket
import ssl
import threading

import structlog

from oncoseg_node.config import HttpTlsConfig

log = structlog.get_logger("oncoseg_node.ops.http")


def server_context(config: HttpTlsConfig) -> ssl.SSLContext:
    """A server context of modern TLS only: 1.2 and 1.3, the library's secure ciphers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # forward secrecy, AEAD (TLS 1.2)
    assert config.cert_file is not None and config.key_file is not None
    ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


class ServerTls:
    """The current server context; ``wrap`` does one connection's handshake."""

    def __init__(self, config: HttpTlsConfig) -> None:
        self.config = config
        self._context = server_context(config)
        self._lock = threading.Lock()

    def reload(self) -> bool:
        try:
            context = server_context(self.config)
        except (ssl.SSLError, OSError) as exc:
            log.error("http_tls_reload_failed", cert_file=str(self.config.cert_file),
                      error=f"{type(exc).__name__}: {exc}")
            return False
        with self._lock:
            self._context = context
        log.info("http_tls_reloaded", cert_file=str(self.config.cert_file))
        return True

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """The TLS socket over ``sock``, handshake not yet done (the caller does it)."""
        with self._lock:
            context = self._context
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
