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


# Zero-padded three-digit ASCII of 0..999, and per digit count (1 to 6) which of
# the six integer columns are leading blanks.
_THREE_DIGITS = np.array([list(f"{k:03d}".encode()) for k in range(1000)], dtype=np.uint8)
_LEADING_BLANK = np.arange(1, 7)[None, :] < 7 - np.arange(7)[:, None]
_POWERS = 10 ** np.arange(1, 6)


def encode_ds_groups(values: np.ndarray, counts: Sequence[int] | np.ndarray) -> list[bytes]:
    """Backslash-separated DS text for consecutive groups of ``counts`` values each.

    0.001 mm resolution, built without per-value Python: each value is laid
    out in a fixed-width row (sign, six integer digits, point, three
    decimals, separator) from a table of three-digit groups, the padding
    spaces are squeezed out and the text is cut at group ends. Values read
    like ``-123.456``, at most 11 characters.
    """
    milli = np.round(np.asarray(values, dtype=np.float64).ravel() * 1000.0).astype(np.int64)
    magnitude = np.abs(milli)
    whole, frac = np.divmod(magnitude, 1000)
    if whole.size and int(whole.max()) >= 10**6:
        raise RTStructError("a contour coordinate exceeds 999999 mm")
    digits = np.searchsorted(_POWERS, whole, side="right") + 1  # integer digits, 1 to 6
    # Columns: 0 sign, 1-6 integer digits, 7 point, 8-10 decimals, 11 separator.
    rows = np.empty((milli.size, 12), dtype=np.uint8)
    rows[:, 0] = ord(" ")
    thousands, units = np.divmod(whole, 1000)
    rows[:, 1:4] = _THREE_DIGITS[thousands]
    rows[:, 4:7] = _THREE_DIGITS[units]
    rows[:, 1:7][_LEADING_BLANK[digits]] = ord(" ")
    rows[:, 7] = ord(".")
    rows[:, 8:11] = _THREE_DIGITS[frac]
    rows[:, 11] = ord("\\")
    negative = milli < 0
    where = np.flatnonzero(negative)
    rows[where, 6 - digits[where]] = ord("-")
    text = rows[rows != ord(" ")].tobytes()
    # each value: its digits, point, three decimals, separator, and a sign if negative
    value_ends = np.cumsum(digits + 5 + negative)
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
