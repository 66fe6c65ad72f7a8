"""structlog setup: JSON lines for journald, readable lines on a terminal.

Context that belongs to one job (job_id, series_uid, calling_ae) is bound on
the logger where the job is handled, so every line about a job carries it.
Audit records (series received, structure set delivered) carry ``audit=True``.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from oncoseg_node.config import LoggingConfig


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library (pynetdicom logs through it)."""
    stream = stream or sys.stdout
    use_json = config.format == "json" or (
        config.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    level = getattr(logging, config.level.upper())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # pynetdicom is chatty at INFO (every PDU); its warnings still matter.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
