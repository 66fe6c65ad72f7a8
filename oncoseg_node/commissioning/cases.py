"""Commissioning cases: a CT series, its reference contours and ours, each named for the record.

A case is a CT folder, the institution's reference RT Structure Set and
either our structure set (``ours.dcm``) or, when there is none, the contours
the node draws for it now. Every case carries its identity (patient,
series, files, node and protocol versions), so a number in a report can be
traced back to the data and the software that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom

from oncoseg_node import __version__
from oncoseg_node.commissioning.evaluate import StructureMetrics, compare_sets
from oncoseg_node.config import load_config
from oncoseg_node.contouring.folder import series_paths
from oncoseg_node.contouring.pipeline import contour, load_ct_series
from oncoseg_node.errors import OncosegError
from oncoseg_node.rtstruct.reader import (
    rasterize_crops,
    read_structure_set,
    referenced_series_uid,
)

# Our structure sets name their protocol in each ROIGenerationDescription.
_PROTOCOL_IN_DESCRIPTION = re.compile(r"protocol (\S+)@(\S+)")


@dataclass(frozen=True)
class CaseIdentity:
    """Where a case's numbers come from."""

    case: str
    patient_id: str
    series_uid: str
    series_description: str
    ct_files: str          # folder and number of CT files read
    reference_file: str
    ours_file: str         # our structure set, or "contoured now"
    node_version: str      # of the node that drew our contours
    protocol: str          # name@version of the protocol that chose them


@dataclass(frozen=True)
class CaseResult:
    identity: CaseIdentity
    rows: list[StructureMetrics]


def _protocol_of(ds: pydicom.Dataset) -> str:
    for item in ds.get("StructureSetROISequence", []):
        match = _PROTOCOL_IN_DESCRIPTION.search(str(item.get("ROIGenerationDescription", "")))
        if match:
            return f"{match.group(1)}@{match.group(2)}"
    return "-"


def evaluate_case(series_dir: Path, reference: Path, ours: Path | None, *, case: str,
                  config_path: Path, aliases: Mapping[str, str], series_uid: str | None = None,
                  tolerance_mm: float = 2.0) -> CaseResult:
    """Metrics of every reference structure of one case, with the case's identity.

    The CT series is ``series_uid``, or the one the reference is drawn on
    when the folder holds several.
    """
    reference_ds = read_structure_set(reference)
    ours_ds = read_structure_set(ours) if ours is not None else None
    paths = series_paths(series_dir, series_uid, referenced_series_uid(reference_ds))
    volume, report = load_ct_series(paths)
    reference_masks = rasterize_crops(reference_ds, volume)
    if ours is not None and ours_ds is not None:
        # the same file given twice (a self-comparison) is rasterised once
        same = Path(ours).resolve() == Path(reference).resolve()
        our_masks = reference_masks if same else rasterize_crops(ours_ds, volume)
        node_version = str(ours_ds.get("SoftwareVersions", "") or "-")
        protocol = _protocol_of(ours_ds)
        ours_file = str(ours)
    else:
        from oncoseg_node.contouring.engines.registry import build_engines
        from oncoseg_node.contouring.protocols import load_protocols

        config = load_config(config_path)
        protocols = load_protocols(config.protocols)
        chosen = protocols.match(volume.header, None)
        if chosen is None:
            raise OncosegError(f"{series_dir}: no protocol matches and no fallback is set")
        results = contour(volume, report, chosen, build_engines(config.engine)).results
        our_masks = {r.name: r.found_crop for r in results if not r.absent}
        node_version, protocol = __version__, f"{chosen.name}@{protocols.version}"
        ours_file = "contoured now"
    header = volume.header
    identity = CaseIdentity(
        case=case, patient_id=str(header.get("PatientID", "") or ""),
        series_uid=volume.series_instance_uid,
        series_description=str(header.get("SeriesDescription", "") or ""),
        ct_files=f"{series_dir} ({len(paths)} files)", reference_file=str(reference),
        ours_file=ours_file, node_version=node_version, protocol=protocol)
    rows = compare_sets(volume, our_masks, reference_masks, case=case, aliases=aliases,
                        tolerance_mm=tolerance_mm)
    return CaseResult(identity, rows)


def evaluate_folder(cases_dir: Path, *, config_path: Path,
                    aliases: Mapping[str, str]) -> list[CaseResult]:
    """Each sub-folder of ``cases_dir``: ``ct/``, ``reference.dcm`` and maybe ``ours.dcm``."""
    folders = sorted(d for d in Path(cases_dir).iterdir() if d.is_dir())
    if not folders:
        raise OncosegError(f"{cases_dir}: no case folders")
    results = []
    for folder in folders:
        ours = folder / "ours.dcm"
        results.append(evaluate_case(folder / "ct", folder / "reference.dcm",
                                     ours if ours.exists() else None, case=folder.name,
                                     config_path=config_path, aliases=aliases))
    return results
