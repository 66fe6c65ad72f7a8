"""One log stream: JSON lines for journald, readable lines on a terminal.

Our own records (structlog) and the standard-library records of the
libraries underneath (pynetdicom, apscheduler, pydicom, Python warnings) all
end in one handler on the root logger, rendered by structlog's
``ProcessorFormatter``: the same timestamp, level, logger name and JSON (or
console) layout, one line per record, through one lock on one stream. Nothing
goes to the stream by any other way, so journald never sees a plain-text line
between JSON ones.

Context that belongs to one job (job_id, series_uid, calling_ae) is bound on
the logger where the job is handled, so every line about a job carries it.
Audit records (series received, structure set delivered) carry ``audit=True``.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

import structlog

from oncoseg_node.config import LoggingConfig

# pynetdicom logs every PDU at INFO and apscheduler every job run; their
# warnings and errors still matter and are kept.
CHATTY_LIBRARIES = ("pynetdicom", "apscheduler")

log = structlog.get_logger("oncoseg_node.ops.logs")


class NodeLogHandler(logging.StreamHandler[TextIO]):
    """The one handler the node installs on the root logger (replaced on reconfiguring)."""


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Send structlog and the standard library's records to ``stream`` in one format."""
    stream = stream or sys.stdout
    use_json = config.format == "json" or (
        config.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    level = getattr(logging, config.level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = NodeLogHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, NodeLogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn (pydicom's, numpy's) as records
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException,
                  traceback: TracebackType | None) -> None:
    log.critical("uncaught_exception", exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    log.critical("uncaught_exception_in_thread",
                 thread=args.thread.name if args.thread else None, exc_info=exc_info)
