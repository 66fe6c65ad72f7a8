"""QA snapshot: a job's contours over axial, coronal and sagittal CT slices, as one PNG.

The picture a physicist glances at on the ``/jobs`` page before opening the
planning system: the three planes through the centroid of the contoured
structures, each structure outlined in its protocol colour, shown in the
radiological convention (patient's right on the image left; head at the
top; anterior at the top of the axial and on the left of the sagittal) with
orientation letters. Planes are resampled to square pixels in millimetres,
so coronal and sagittal views keep true proportions whatever the slice
spacing, and the patient is reoriented from the volume's direction cosines,
so a prone or feet-first series is shown the same way as a supine one.

The PNG is encoded here (zlib + struct): numpy and the standard library
suffice, and the node gains no imaging dependency.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.durable import private_dir, write_durably

if TYPE_CHECKING:  # the pipeline imports the RTSTRUCT writer; only its type is needed
    from oncoseg_node.contouring.pipeline import Contoured

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A window wide enough for the body outline (air/fat), lungs and soft tissue at once.
DEFAULT_WINDOW = (-100.0, 700.0)  # (level, width) in HU
BACKGROUND = (16, 16, 16)
LETTER_COLOR = (225, 225, 225)  # neutral: no structure colour is mistaken for a letter
LINE_PX = 2
LABEL_PX = 22  # margin around each panel for its orientation letters
CROP_MARGIN_MM = 15.0
GAP_PX = 4  # between panels, whose letter margins already separate them
LETTER_SCALE = 2

# 5x7 glyphs for the orientation letters only.
_GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
}


@dataclass(frozen=True, eq=False)
class Overlay:
    """One structure to outline: a boolean ``(z, y, x)`` mask on the volume's grid, or its crop.

    ``external`` marks the body outline: drawn like any other, but left out
    when choosing where the planes cut (see :func:`render_qa`).
    """

    name: str
    mask: np.ndarray | MaskCrop
    color: tuple[int, int, int]
    external: bool = False


def qa_relpath(job_id: int, version: int) -> str:
    """Where a job's snapshot lives under the state directory (next to its outbox files).

    Built from the ledger's integers only, never from a received value.
    """
    return f"outbox/job{int(job_id)}-v{int(version)}-qa.png"


def overlays_of(contoured: Contoured) -> list[Overlay]:
    """The present structures of a contoured series, in their protocol colours."""
    library = {s.name: s for s in contoured.protocol.structures}
    return [Overlay(r.name, r.found_crop, library[r.name].color,
                    external=library[r.name].interpreted_type == "EXTERNAL")
            for r in contoured.results if not r.absent and r.name in library]


def write_qa_snapshot(path: Path, volume: Volume, overlays: Sequence[Overlay], *,
                      panel_px: int = 360) -> None:
    """Render and write the snapshot atomically (a reader never sees half a file)."""
    private_dir(path.parent)
    write_durably(path, encode_png(render_qa(volume, overlays, panel_px=panel_px)))


# -- geometry -----------------------------------------------------------------


@dataclass(frozen=True)
class _Canonical:
    """The volume as an LPS-ordered array: axis 0 -> +z (head), 1 -> +y (posterior),
    2 -> +x (patient's left); ``coords`` are voxel centres in mm along each axis.

    ``hu`` is a view of the volume's array; the masks are crops reoriented
    with their boxes, so no full-size mask is built."""

    hu: np.ndarray
    masks: list[MaskCrop]
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    # for each canonical axial index, the slice of the series it shows (None
    # when the series was not acquired axially)
    slice_of_z: np.ndarray | None = None


def _reoriented(crop: MaskCrop, order: Sequence[int], flips: Sequence[bool]) -> MaskCrop:
    """A crop on the canonical grid: its box permuted and mirrored with the array."""
    shape, box, array = [], [], np.transpose(crop.array, order)
    for axis, (a, flip) in enumerate(zip(order, flips, strict=True)):
        n, cut = crop.shape[a], crop.box[a]
        shape.append(n)
        box.append(slice(n - cut.stop, n - cut.start) if flip else cut)
        if flip:
            array = np.flip(array, axis=axis)
    return MaskCrop((shape[0], shape[1], shape[2]), (box[0], box[1], box[2]),
                    np.ascontiguousarray(array))


def _canonical(volume: Volume, masks: Sequence[np.ndarray | MaskCrop]) -> _Canonical:
    # Patient direction of increasing index along each array axis (z, y, x).
    directions = np.stack([volume.normal, volume.col_direction, volume.row_direction])
    n_rows, n_cols = volume.shape[1], volume.shape[2]
    array_coords = [
        volume.slice_offsets - volume.slice_offsets[0],
        np.arange(n_rows) * volume.pixel_spacing[0],
        np.arange(n_cols) * volume.pixel_spacing[1],
    ]
    dominant = np.argmax(np.abs(directions), axis=1)  # patient axis (0=x, 1=y, 2=z) per array axis
    if sorted(dominant.tolist()) != [0, 1, 2]:
        # An orientation near 45 degrees has no clear anatomical plane; show the array as is.
        dominant = np.array([2, 1, 0])
    # canonical axis k (0: patient z, 1: patient y, 2: patient x) comes from array axis order[k]
    order = [int(np.nonzero(dominant == patient_axis)[0][0]) for patient_axis in (2, 1, 0)]
    flips = [directions[a][dominant[a]] < 0 for a in order]

    def reorient(array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, order)
        for axis, flip in enumerate(flips):
            if flip:
                out = np.flip(out, axis=axis)
        return out

    coords = []
    for a, flip in zip(order, flips, strict=True):
        c = array_coords[a]
        coords.append((c[-1] - c[::-1]) if flip else c)
    slice_of_z = None
    if order[0] == 0:
        slice_of_z = np.arange(volume.shape[0])[::-1] if flips[0] else np.arange(volume.shape[0])
    crops = [m if isinstance(m, MaskCrop) else MaskCrop.of(m) for m in masks]
    return _Canonical(reorient(volume.hu), [_reoriented(c, order, flips) for c in crops],
                      (coords[0], coords[1], coords[2]), slice_of_z)


def _nearest(coords: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Index of the voxel centre nearest each position (coords ascending)."""
    if len(coords) == 1:
        return np.zeros(len(positions), dtype=np.intp)
    midpoints = (coords[1:] + coords[:-1]) / 2.0
    return np.searchsorted(midpoints, positions)


def _axis_samples(span: tuple[float, float], coords: np.ndarray, step_mm: float) -> np.ndarray:
    """Indices sampling one axis every ``step_mm`` from ``span[0]`` to ``span[1]`` (mm)."""
    count = max(int(round((span[1] - span[0]) / step_mm)) + 1, 1)
    return _nearest(coords, span[0] + np.arange(count) * step_mm)


def _spans(canon: _Canonical) -> list[tuple[float, float]]:
    """Per canonical axis, the mm range shown: the structures' extent plus a margin.

    Cropping to what was contoured (the body, when External is among the
    structures) spends the pixels on anatomy rather than on the air and couch
    around it. Without structures the whole volume is shown.
    """
    present = [m for m in canon.masks if not m.empty]
    spans = []
    for axis, coords in enumerate(canon.coords):
        if not present:
            spans.append((float(coords[0]), float(coords[-1])))
            continue
        # the union's extent is the hull of the (tight) boxes
        first = min(m.box[axis].start for m in present)
        last = max(m.box[axis].stop for m in present) - 1
        lo = max(float(coords[first]) - CROP_MARGIN_MM, float(coords[0]))
        hi = min(float(coords[last]) + CROP_MARGIN_MM, float(coords[-1]))
        spans.append((lo, hi))
    return spans


def _center(canon: _Canonical, external: Sequence[bool]) -> tuple[int, int, int]:
    """Canonical index of the centroid of the organs (the body outline only if alone)."""
    chosen = [m for m, ext in zip(canon.masks, external, strict=True) if not ext]
    present = [m for m in chosen or canon.masks if not m.empty]
    if not present:
        z, y, x = canon.hu.shape
        return z // 2, y // 2, x // 2
    # the union (overlapping structures count once) within the hull of their boxes
    low = [min(m.box[a].start for m in present) for a in range(3)]
    high = [max(m.box[a].stop for m in present) for a in range(3)]
    union = np.zeros([h - lo for lo, h in zip(low, high, strict=True)], dtype=bool)
    for m in present:
        union[tuple(slice(c.start - lo, c.stop - lo)
                    for c, lo in zip(m.box, low, strict=True))] |= m.array
    iz, iy, ix = (int(round(float(np.mean(i + lo))))
                  for i, lo in zip(np.nonzero(union), low, strict=True))
    return iz, iy, ix


# -- drawing ------------------------------------------------------------------


def _gray(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    level, width = window
    scaled = (hu - (level - width / 2.0)) / width * 255.0
    gray = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The inner ``LINE_PX`` pixels of a mask's boundary (image edges count as boundary)."""
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=LINE_PX, border_value=0)
    return mask & ~inner


def _letter(image: np.ndarray, char: str, top: int, left: int) -> None:
    glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[char]], dtype=bool)
    glyph = np.kron(glyph, np.ones((LETTER_SCALE, LETTER_SCALE), dtype=bool)).astype(bool)
    h, w = glyph.shape
    top = int(np.clip(top, 0, max(image.shape[0] - h, 0)))
    left = int(np.clip(left, 0, max(image.shape[1] - w, 0)))
    region = image[top:top + h, left:left + w]
    region[glyph[:region.shape[0], :region.shape[1]]] = LETTER_COLOR


def _labelled(image: np.ndarray, top: str, bottom: str, left: str, right: str) -> np.ndarray:
    """The panel framed by a margin holding its orientation letters.

    The letters sit beside the image, never on it, so no anatomy or contour
    is hidden behind one.
    """
    h, w = image.shape[:2]
    out = np.empty((h + 2 * LABEL_PX, w + 2 * LABEL_PX, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    out[LABEL_PX:LABEL_PX + h, LABEL_PX:LABEL_PX + w] = image
    gh, gw = 7 * LETTER_SCALE, 5 * LETTER_SCALE
    centre_row, centre_col = LABEL_PX + (h - gh) // 2, LABEL_PX + (w - gw) // 2
    _letter(out, top, (LABEL_PX - gh) // 2, centre_col)
    _letter(out, bottom, LABEL_PX + h + (LABEL_PX - gh) // 2, centre_col)
    _letter(out, left, centre_row, (LABEL_PX - gw) // 2)
    _letter(out, right, centre_row, LABEL_PX + w + (LABEL_PX - gw) // 2)
    return out


def _panel(hu2d: np.ndarray, masks2d: Sequence[np.ndarray], colors: Sequence[tuple[int, ...]],
           rows: np.ndarray, cols: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """One plane resampled with ``rows``/``cols`` index lists, outlines drawn in order."""
    image = _gray(hu2d[np.ix_(rows, cols)], window)
    for mask, color in zip(masks2d, colors, strict=True):
        image[_outline(mask[np.ix_(rows, cols)])] = color
    return image


def render_views(volume: Volume, overlays: Sequence[Overlay], *, panel_px: int = 360,
                 window: tuple[float, float] = DEFAULT_WINDOW) -> list[np.ndarray]:
    """The axial, coronal and sagittal panels, each framed by its orientation letters.

    The planes cross at the centroid of the structures' union; each view is
    cropped to the structures' extent plus a margin, and all share one scale
    so that the largest cropped extent spans ``panel_px`` pixels. The body
    outline is left out of the centroid when organs are present: being by far
    the largest, it would pull the planes to the body's centre and past the
    organs a reviewer checks. With no structures the planes cut the volume's
    centre and the whole volume is shown.
    """
    canon = _canonical(volume, [o.mask for o in overlays])
    colors = [o.color for o in overlays]
    cz, cy, cx = _center(canon, [o.external for o in overlays])
    spans = _spans(canon)
    step = max(max(hi - lo for lo, hi in spans) / max(panel_px - 1, 1), 1e-3)
    zi, yi, xi = (_axis_samples(span, c, step) for span, c in zip(spans, canon.coords,
                                                                   strict=True))
    zi_top = zi[::-1]  # head at the top of coronal and sagittal views
    axial = _panel(canon.hu[cz], [m.section(0, cz) for m in canon.masks], colors, yi, xi,
                   window)
    coronal = _panel(canon.hu[:, cy, :], [m.section(1, cy) for m in canon.masks], colors,
                     zi_top, xi, window)
    sagittal = _panel(canon.hu[:, :, cx], [m.section(2, cx) for m in canon.masks], colors,
                      zi_top, yi, window)
    return [_labelled(axial, "A", "P", "R", "L"), _labelled(coronal, "S", "I", "R", "L"),
            _labelled(sagittal, "S", "I", "A", "P")]


def render_qa(volume: Volume, overlays: Sequence[Overlay], *, panel_px: int = 360,
              window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """The snapshot as an ``(height, width, 3)`` uint8 RGB array: the three views of
    :func:`render_views` side by side, top-aligned."""
    panels = render_views(volume, overlays, panel_px=panel_px, window=window)
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP_PX * (len(panels) + 1)
    out = np.empty((height + 2 * GAP_PX, width, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    left = GAP_PX
    for panel in panels:
        out[GAP_PX:GAP_PX + panel.shape[0], left:left + panel.shape[1]] = panel
        left += panel.shape[1] + GAP_PX
    return out


# -- PNG ----------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(height, width, 3)`` uint8 array as an 8-bit RGB PNG.

    Every row uses the Sub filter (each byte minus the one a pixel to its
    left), which makes the smooth CT background compress well.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    flat = rgb.reshape(height, width * 3)
    filtered = flat.copy()
    filtered[:, 3:] = flat[:, 3:] - flat[:, :-3]  # uint8 arithmetic wraps modulo 256
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1:] = filtered
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))
