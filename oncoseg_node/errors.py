"""The node's exceptions: one base class, each subclass says when it is raised.

Callers catch :class:`OncosegError` at process boundaries (CLI, worker loop)
and turn it into an exit code or a job state; nothing else is caught broadly.
"""

from __future__ import annotations


class OncosegError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(OncosegError):
    """Raised by config and protocol loading when one or more keys are invalid.

    ``problems`` holds every problem found, each naming its key (and, where
    known, file and line), so an operator fixes them all in one pass.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems))


class GeometryError(OncosegError):
    """Raised when a CT series cannot be contoured safely as one volume.

    Examples: mixed frames of reference, orientations or pixel spacings, a
    missing slice, gantry tilt. The job is held with this message as reason.
    """


class SeriesLoadError(OncosegError):
    """Raised when stored instances cannot be read as a CT series at all."""


class PixelDecodeError(SeriesLoadError):
    """Raised when a stored instance's pixel data cannot be decoded.

    Intake accepts compressed transfer syntaxes and stores them as received;
    decoding happens when the series is loaded. A frame that fails holds the
    job with this message (file, transfer syntax, codec error) as reason:
    the instance must be resent, retrying will not help.
    """


class EngineError(OncosegError):
    """Raised when a segmentation engine cannot start or cannot run.

    At startup this is fatal (missing weights, missing GPU); during a job it
    fails the job with the message as reason.
    """


class RTStructError(OncosegError):
    """Raised when an RT Structure Set cannot be built or fails its own check."""


class LedgerError(OncosegError):
    """Raised on a job or delivery state move the ledger forbids, or an unknown state;
    and at open when the ledger file is damaged or was written by a newer release.
    """


class StartupError(OncosegError):
    """Raised when the node cannot start and nothing was changed.

    Examples: another node holds the state directory, the DICOM or HTTP port
    is taken. The CLI exits with its own code, which the systemd unit lists
    in ``RestartPreventExitStatus``: restarting cannot fix it.
    """
