"""One series through the contouring path, with no network and no ledger.

Used by the worker for every job and by ``oncoseg-node segment`` offline, so
the two can never drift apart: files -> geometry gate -> volume -> protocol
-> engines -> sanity flags. :mod:`oncoseg_node.rtstruct.draft` writes the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.registry import EngineSet
from oncoseg_node.contouring.geometry import GeometryReport, check_series
from oncoseg_node.contouring.protocols import Protocol
from oncoseg_node.contouring.sanity import crop_volume_cc, flag_results
from oncoseg_node.contouring.volume import Volume, check_type1, read_ct_slices, volume_from_files
from oncoseg_node.errors import GeometryError, SeriesLoadError


@dataclass(frozen=True)
class Contoured:
    """The outcome of contouring one series with one protocol."""

    volume: Volume
    protocol: Protocol
    results: list[StructureResult]
    geometry: GeometryReport

    def summary(self) -> list[dict[str, Any]]:
        """Per-structure record for the ledger and the QA page."""
        rows = []
        for result in self.results:
            volume_cc = (None if result.absent
                         else crop_volume_cc(self.volume, result.found_crop))
            rows.append({
                "name": result.name,
                "absent": result.absent,
                "score": result.score,
                "volume_cc": round(volume_cc, 2) if volume_cc is not None else None,
                "flags": list(result.flags),
                "note": result.note,
            })
        return rows


def load_ct_series(paths: Sequence[Path], spacing_tolerance_mm: float = 0.1, *,
                   override_geometry: bool = False) -> tuple[Volume, GeometryReport]:
    """Read, gate and stack one CT series (raises GeometryError / SeriesLoadError).

    ``override_geometry`` is an operator's release of a held series: the gate's
    findings are kept in the report but do not stop contouring.
    """
    # headers first: the series is chosen and gated before any pixel is decoded
    datasets = [ds for ds in read_ct_slices(paths, pixels=False)
                if str(ds.get("SOPClassUID", "")) == CTImageStorage]
    if not datasets:
        raise SeriesLoadError("no CT Image Storage instances found")
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise SeriesLoadError(f"files belong to {len(series)} different series")
    check_type1(datasets)
    try:
        report = check_series(datasets, spacing_tolerance_mm=spacing_tolerance_mm)
    except GeometryError as exc:
        if not override_geometry:
            raise
        report = GeometryReport(len(datasets), 0.0, 0.0, False, overridden=str(exc))
    return volume_from_files(datasets), report


def contour(volume: Volume, report: GeometryReport, protocol: Protocol,
            engines: EngineSet) -> Contoured:
    results = engines.segment(volume, protocol.structures)
    return Contoured(volume, protocol, flag_results(volume, protocol.structures, results),
                     report)
