"""``oncoseg-node segment``: one folder's CT series contoured with no network or ledger.

Every argument is checked before a pixel is read: the profile, the protocol
name, the output folder, the input folder and the series chosen in it. Only
then is the series loaded, contoured and its structure set written through
the same pipeline and writer the worker (:mod:`oncoseg_node.ops.worker`) uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid

from oncoseg_node.config import Config
from oncoseg_node.contouring.engines.registry import build_engines
from oncoseg_node.contouring.folder import output_path, series_paths
from oncoseg_node.contouring.pipeline import contour, load_ct_series
from oncoseg_node.contouring.protocols import load_protocols
from oncoseg_node.errors import OncosegError
from oncoseg_node.rtstruct.draft import write_structure_set
from oncoseg_node.rtstruct.profiles import get_profile


def segment_folder(config: Config, series_dir: Path, output: Path, *,
                   protocol_name: str | None = None, profile_name: str = "generic",
                   series_uid: str | None = None,
                   say: Callable[[str], None] = print) -> Path:
    """Contour the chosen CT series of ``series_dir``; returns the file written.

    ``output`` is a file, or an existing folder that receives
    ``RS.<SOP Instance UID>.dcm``. Raises :class:`OncosegError` (one line).
    """
    protocols = load_protocols(config.protocols)
    try:
        profile = get_profile(profile_name)
    except ValueError as exc:
        raise OncosegError(str(exc)) from None
    chosen = None
    if protocol_name:
        try:
            chosen = protocols.by_name(protocol_name)
        except KeyError:
            names = ", ".join(p.name for p in protocols.protocols)
            raise OncosegError(f"no protocol named {protocol_name!r} (have: {names})") from None
    output, output_is_folder = output_path(output)
    paths = series_paths(series_dir, series_uid, say=say)
    volume, report = load_ct_series(paths, config.series.slice_spacing_tolerance_mm)
    if volume.hu_note:
        say(f"warning: {volume.hu_note}")
    protocol = chosen or protocols.match(volume.header, None)
    if protocol is None:
        raise OncosegError("no protocol matches this series and no fallback is set")
    engines = build_engines(config.engine)
    started = time.monotonic()
    contoured = contour(volume, report, protocol, engines)
    uid = generate_uid()
    if output_is_folder:
        output = output / f"RS.{uid}.dcm"
    write_structure_set(contoured, protocols, engines, profile, output, sop_instance_uid=uid)
    for row in contoured.summary():
        state = "absent" if row["absent"] else f"{row['volume_cc']:.1f} cc"
        say(f"  {row['name']:<24} {state}  {' '.join(row['flags'])}".rstrip())
    say(f"{output}: {len(contoured.results)} structures, protocol {protocol.name}, "
        f"{time.monotonic() - started:.1f} s")
    return output
