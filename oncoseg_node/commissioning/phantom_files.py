"""The phantom as a scanner and a physicist would hand it over: fresh UIDs, truth as RTSTRUCT.

``with_new_uids`` gives a phantom new study, series, frame of reference and
instance UIDs, so sending it again is a new series rather than a duplicate.
``write_reference`` writes the phantom's known organs as an RT Structure
Set on its CT, the "manual contours" ``oncoseg-node evaluate`` compares with.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from pydicom.uid import generate_uid

from oncoseg_node import __version__
from oncoseg_node.commissioning.phantom import Phantom
from oncoseg_node.contouring.protocols import load_protocols
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct

FALLBACK_COLOR = (200, 200, 200)


def with_new_uids(phantom: Phantom) -> Phantom:
    """The same pixels and truth under new (random) study, series, frame and SOP UIDs."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for ds in phantom.datasets:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
    header = copy.deepcopy(phantom.volume.header)
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                           ("FrameOfReferenceUID", frame),
                           ("SOPInstanceUID", datasets[0].SOPInstanceUID)):
        if keyword in header:
            setattr(header, keyword, value)
    volume = replace(phantom.volume, study_instance_uid=study, series_instance_uid=series,
                     frame_of_reference_uid=frame, header=header,
                     sop_instance_uids=tuple(ds.SOPInstanceUID for ds in datasets))
    return Phantom(datasets, phantom.truth, volume)


def write_reference(phantom: Phantom, path: Path, protocols_path: Path | None = None) -> int:
    """Write the truth masks as an RT Structure Set at ``path``; returns the ROI count.

    Colours come from the structure library of ``protocols_path`` when it
    names the structure. An organ the phantom's slices do not reach is left
    out: a structure set has no empty ROI contours.
    """
    library = load_protocols(protocols_path).library if protocols_path else {}
    rois = []
    for name in sorted(phantom.truth):
        if not phantom.truth[name].any():
            continue
        known = library.get(name)
        rois.append(RoiMask(name, known.color if known else FALLBACK_COLOR,
                            "EXTERNAL" if name == "External" else "ORGAN", phantom.truth[name]))
    info = GenerationInfo("phantom truth", f"oncoseg-node {__version__}", "phantom", "truth")
    ds = build_rtstruct(phantom.volume, rois, info, PROFILES["generic"])
    ds.StructureSetLabel = "PHANTOM TRUTH"
    ds.StructureSetName = "PHANTOM TRUTH"
    ds.SeriesDescription = "PHANTOM REFERENCE CONTOURS"
    ds.StructureSetDescription = ("The phantom's analytic organs, written as reference "
                                  "contours for oncoseg-node evaluate.")
    for item in ds.StructureSetROISequence:
        item.ROIGenerationAlgorithm = "MANUAL"
        item.ROIGenerationDescription = "phantom analytic truth"
    save_verified(ds, Path(path), phantom.volume, PROFILES["generic"])
    return len(rois)
