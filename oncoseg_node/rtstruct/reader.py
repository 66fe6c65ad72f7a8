"""An RT Structure Set rasterised back onto its CT volume.

Each contour is matched to its slice through the Contour Image Sequence (or,
failing that, the nearest slice plane), its LPS points are mapped into that
slice's own pixel index space, and all contours of one ROI on a slice are
filled together with the even-odd rule (nested contours are holes). A pixel
belongs to the ROI when its centre is inside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct.contours import fill_polygons


def _to_index(volume: Volume, z: int, points: np.ndarray) -> np.ndarray:
    """(n, 2) fractional (row, column) indices of LPS points on slice ``z``."""
    delta = points - volume.positions[z][None, :]
    cols = delta @ volume.row_direction / volume.pixel_spacing[1]
    rows = delta @ volume.col_direction / volume.pixel_spacing[0]
    return np.stack([rows, cols], axis=1)


def contour_points(contour: Dataset) -> np.ndarray:
    """A contour item's ContourData as (n, 3) LPS points in mm.

    Parsed from the raw decimal strings when the item has not been decoded
    yet: a thorax structure set holds about a million numbers, and pydicom's
    per-value DS objects cost seconds.
    """
    raw = contour.get_item("ContourData")
    if raw is None:
        return np.zeros((0, 3))
    value = raw.value
    if isinstance(value, bytes | bytearray):
        numbers = np.array(bytes(value).replace(b"\\", b" ").split(), dtype=np.float64)
    else:
        numbers = np.asarray(value, dtype=np.float64)
    return numbers.reshape(-1, 3)


def rasterize_crops(ds: Dataset, volume: Volume) -> dict[str, MaskCrop]:
    """ROI name -> its mask on ``volume``'s grid, filled only within its contours' box."""
    slice_of = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    offsets = volume.slice_offsets
    names = {int(item.ROINumber): str(item.ROIName)
             for item in ds.get("StructureSetROISequence", [])}
    depth, height, width = volume.shape
    crops = {}
    for roi in ds.get("ROIContourSequence", []):
        per_slice: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            points = contour_points(contour)
            if not len(points):
                continue
            refs = contour.get("ContourImageSequence")
            z = slice_of.get(refs[0].ReferencedSOPInstanceUID) if refs else None
            if z is None:
                z = int(np.argmin(np.abs(offsets - float(points[0] @ volume.normal))))
            per_slice.setdefault(z, []).append(_to_index(volume, z, points))
        name = names.get(int(roi.ReferencedROINumber), str(roi.ReferencedROINumber))
        if not per_slice:
            crops[name] = MaskCrop.of(np.zeros((0, 0, 0), bool), shape=volume.shape)
            continue
        # the box of every pixel centre the contours can enclose, within the grid
        every = np.concatenate([p for polygons in per_slice.values() for p in polygons])
        low, high = np.floor(every.min(axis=0)), np.ceil(every.max(axis=0))
        r0, c0 = (int(np.clip(v, 0, n)) for v, n in zip(low, (height, width), strict=True))
        r1, c1 = (int(np.clip(v + 1, 0, n)) for v, n in zip(high, (height, width), strict=True))
        z0, z1 = min(per_slice), max(per_slice) + 1
        block = np.zeros((z1 - z0, r1 - r0, c1 - c0), dtype=bool)
        for z, polygons in per_slice.items():
            fill_polygons(polygons, (r1 - r0, c1 - c0), out=block[z - z0], origin=(r0, c0))
        crops[name] = MaskCrop.of(block, shape=(depth, height, width), origin=(z0, r0, c0))
    return crops


def rasterize_rtstruct(ds: Dataset, volume: Volume) -> dict[str, np.ndarray]:
    """ROI name -> full ``(z, y, x)`` boolean mask on ``volume``'s grid.

    For comparisons that need whole arrays (tests, commissioning metrics);
    :func:`rasterize_crops` holds only each ROI's box.
    """
    return {name: crop.full() for name, crop in rasterize_crops(ds, volume).items()}


def read_structure_set(path: Path) -> Dataset:
    """Read an RT Structure Set file; :class:`RTStructError` names a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise RTStructError(f"{path}: no such structure set file")
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several unrelated types
        raise RTStructError(f"{path}: not a readable DICOM file ({exc})") from None
    if "ROIContourSequence" not in ds:
        raise RTStructError(f"{path}: not an RT Structure Set (Modality "
                            f"{ds.get('Modality', 'unknown')})")
    return ds


def referenced_series_uid(ds: Dataset) -> str | None:
    """The CT series a structure set is drawn on, when it says."""
    try:
        return str(ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                   .RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None
