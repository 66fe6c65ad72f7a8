"""Contour items of an RT Structure Set, encoded directly (Explicit VR Little Endian).

A structure set holds thousands of contour items; building a pydicom Dataset
per item costs more than tracing the contours, so each ROI's ContourSequence
is encoded here as bytes: DS text for every point of the ROI in one
vectorised pass, then one item per closed loop with its image reference,
CLOSED_PLANAR, point count and number. Coordinates are DICOM patient
coordinates in mm (LPS), each point placed with its own slice's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct import encode as le
from oncoseg_node.rtstruct.contours import corners_to_index, keyhole, trace_volume

CONTOUR_IMAGE_SEQUENCE = 0x30060016
CONTOUR_SEQUENCE = 0x30060040
CONTOUR_GEOMETRIC_TYPE = 0x30060042
NUMBER_OF_CONTOUR_POINTS = 0x30060046
CONTOUR_NUMBER = 0x30060048
CONTOUR_DATA = 0x30060050
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155


def encode_ds_groups(values: np.ndarray, counts: Sequence[int] | np.ndarray) -> list[bytes]:
    """Backslash-separated DS text for consecutive groups of ``counts`` values each.

    0.001 mm resolution, built without per-value Python: each value is laid
    out in a fixed-width row (sign, six integer digits, point, three
    decimals, separator), the padding spaces are squeezed out and the text
    is cut at group ends. Values read like ``-123.456``, at most 11
    characters.
    """
    milli = np.round(np.asarray(values, dtype=np.float64).ravel() * 1000.0).astype(np.int64)
    magnitude = np.abs(milli)
    whole, frac = magnitude // 1000, magnitude % 1000
    if whole.size and int(whole.max()) >= 10**6:
        raise RTStructError("a contour coordinate exceeds 999999 mm")
    # Columns: 0 sign, 1-6 integer digits, 7 point, 8-10 decimals, 11 separator.
    digits = np.ones(milli.size, dtype=np.int64)
    for power in range(1, 6):
        digits += whole >= 10**power
    integer_columns = np.arange(1, 7)
    shown = (whole[:, None] // 10 ** (6 - integer_columns)) % 10
    rows = np.empty((milli.size, 12), dtype=np.uint8)
    rows[:, 0] = ord(" ")
    rows[:, 1:7] = np.where(integer_columns < 7 - digits[:, None], ord(" "), ord("0") + shown)
    rows[:, 7] = ord(".")
    rows[:, 8] = ord("0") + frac // 100
    rows[:, 9] = ord("0") + (frac // 10) % 10
    rows[:, 10] = ord("0") + frac % 10
    rows[:, 11] = ord("\\")
    negative = np.flatnonzero(milli < 0)
    rows[negative, 6 - digits[negative]] = ord("-")
    kept = rows != ord(" ")
    text = rows[kept].tobytes()
    value_ends = np.cumsum(kept.sum(axis=1))
    group_ends = value_ends[np.cumsum(counts) - 1].tolist()
    group_starts = [0, *group_ends[:-1]]
    # Each group drops its last separator.
    return [text[start:end - 1] for start, end in zip(group_starts, group_ends, strict=True)]


def contour_image_references(volume: Volume) -> list[bytes]:
    """The encoded ContourImageSequence element of each slice, shared by every ROI."""
    sop_class = volume.sop_class_uid.encode("ascii")
    return [le.element(CONTOUR_IMAGE_SEQUENCE, "SQ", le.item(
        le.element(REFERENCED_SOP_CLASS_UID, "UI", sop_class)
        + le.element(REFERENCED_SOP_INSTANCE_UID, "UI", uid.encode("ascii"))))
        for uid in volume.sop_instance_uids]


CLOSED_PLANAR = le.element(CONTOUR_GEOMETRIC_TYPE, "CS", b"CLOSED_PLANAR")


def roi_loops(mask: np.ndarray | MaskCrop, hole_style: str, min_pixels: int
              ) -> tuple[list[int], list[np.ndarray]]:
    """Slice index and closed loop (corner coordinates) of every contour of one ROI.

    A crop is traced within its box, its loops placed on the volume's grid.
    Holes are joined to their region by keyhole cuts or kept as separate
    inner loops, as the destination's profile says.
    """
    if isinstance(mask, MaskCrop):
        traced = trace_volume(mask.array, min_pixels, straight=True, origin=mask.origin)
    else:
        traced = trace_volume(mask, min_pixels, straight=True)
    slices, loops = [], []
    for z, regions in traced.items():
        for region in regions:
            for loop in ([keyhole(region.outer, region.holes)] if hole_style == "keyhole"
                         else [region.outer, *region.holes]):
                slices.append(z)
                loops.append(loop)
    return slices, loops


def contour_sequence(volume: Volume, name: str, mask: np.ndarray | MaskCrop,
                     hole_style: str, min_pixels: int,
                     image_references: list[bytes]) -> RawDataElement:
    """The ContourSequence of ROI ``name`` from its ``(z, y, x)`` mask or crop, encoded directly.

    Every point is placed with its own slice's position; the items carry
    their image reference, CLOSED_PLANAR, point count, number and data.
    """
    slices, loops = roi_loops(mask, hole_style, min_pixels)
    parts = []
    if loops:
        counts = np.fromiter(map(len, loops), dtype=np.int64, count=len(loops))
        rows, cols = corners_to_index(np.concatenate(loops))
        points = volume.index_to_patient(np.repeat(slices, counts), rows, cols)
        texts = encode_ds_groups(points, 3 * counts)
        for number, (z, n, text) in enumerate(zip(slices, counts.tolist(), texts, strict=True),
                                              start=1):
            try:
                data = le.element(CONTOUR_DATA, "DS", text)
            except le.EncodingError:
                raise RTStructError(
                    f"ROI {name}: its contour on slice {z + 1} has {n} points, more "
                    "than one ContourData value can hold") from None
            parts.append(le.item(image_references[z] + CLOSED_PLANAR
                                 + le.element(NUMBER_OF_CONTOUR_POINTS, "IS", str(n).encode())
                                 + le.element(CONTOUR_NUMBER, "IS", str(number).encode())
                                 + data))
    body = b"".join(parts)
    return RawDataElement(Tag(CONTOUR_SEQUENCE), "SQ", len(body), body, 0, False, True)
