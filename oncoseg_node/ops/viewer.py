"""The job page's slice viewer: any axial, coronal or sagittal slice of a job, as a PNG.

The server renders each slice (numpy and the PNG encoder of :mod:`.qa`), so
the page needs no imaging library and works offline in any browser. What is
drawn is what was sent: the job's structure set, rasterised back onto the
CT series from the spool, outlined in the structure set's own colours, in
the radiological convention of the QA snapshot (patient's right on the
image left, head at the top, anterior at the top of the axial and on the
left of the sagittal). Coronal and sagittal slices are resampled to square
millimetre pixels.

A loaded job is about 2 bytes per CT voxel plus its structures cropped to
their extent; :class:`ViewerCache` keeps the most recent few.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.ops.qa import _axis_samples, _canonical, _labelled, _panel, encode_png

# (level, width) in HU, as planning systems name them
WINDOWS: dict[str, tuple[float, float]] = {
    "soft": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (-100.0, 700.0),
}
PLANES = ("axial", "coronal", "sagittal")
# Orientation letters (top, bottom, left, right) of each plane.
_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"),
            "sagittal": ("S", "I", "A", "P")}


@dataclass(frozen=True)
class ViewerStructure:
    """One structure: its name, colour and mask cropped to its box (canonical axes)."""

    name: str
    color: tuple[int, int, int]
    crop: MaskCrop

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return self.crop.box


class JobViewer:
    """A job's CT and structures, ready to render any slice."""

    def __init__(self, volume: Volume, structures: Sequence[tuple[str, tuple[int, int, int],
                                                                  np.ndarray | MaskCrop]]
                 ) -> None:
        canon = _canonical(volume, [mask for _, _, mask in structures])
        # HU fit int16 exactly (CT stores 12 to 16 bits); half the memory of float32
        self.hu = np.clip(np.rint(canon.hu), -32768, 32767).astype(np.int16)
        self.coords = canon.coords
        self.structures: list[ViewerStructure] = []
        for (name, color, _), crop in zip(structures, canon.masks, strict=True):
            self.structures.append(ViewerStructure(name, color, crop))
        slices = canon.slice_of_z if canon.slice_of_z is not None else np.arange(len(canon.hu))
        # Each axial slice's table position: the z of its own ImagePositionPatient.
        self.axial_mm = [float(volume.positions[int(k)][2]) for k in slices]
        # Coronal and sagittal cuts by their patient y and x (LPS): the lowest
        # voxel-centre coordinate of the series along that axis, plus the cut's offset.
        corners = volume.index_to_patient(
            np.zeros(4, dtype=int), np.array([0, 0, volume.shape[1] - 1, volume.shape[1] - 1]),
            np.array([0, volume.shape[2] - 1, 0, volume.shape[2] - 1]))
        self._origin_mm = {"coronal": float(corners[:, 1].min()),
                           "sagittal": float(corners[:, 0].min())}
        self.step_mm = float(min(np.diff(canon.coords[1]).min() if len(canon.coords[1]) > 1
                                 else 1.0,
                                 np.diff(canon.coords[2]).min() if len(canon.coords[2]) > 1
                                 else 1.0))

    @property
    def start(self) -> dict[str, int]:
        """Where the viewer opens: the middle of the organs' extent (the body's if alone)."""
        present = [s for s in self.structures if s.box[0].stop > s.box[0].start]
        organs = [s.box for s in present if s.name.lower() not in ("external", "body")] or \
            [s.box for s in present]
        if not organs:
            return {p: n // 2 for p, n in self.counts.items()}
        return {plane: (min(b[a].start for b in organs) + max(b[a].stop for b in organs)) // 2
                for a, plane in enumerate(PLANES)}

    @property
    def counts(self) -> dict[str, int]:
        """Number of slices in each plane."""
        z, y, x = self.hu.shape
        return {"axial": z, "coronal": y, "sagittal": x}

    def positions_mm(self, plane: str) -> list[float]:
        """Each slice's patient coordinate in mm (LPS): z axial, y coronal, x sagittal."""
        if plane == "axial":
            return self.axial_mm
        axis = 1 if plane == "coronal" else 2
        return [self._origin_mm[plane] + float(c) for c in self.coords[axis]]

    def _plane_mask(self, s: ViewerStructure, plane: str, index: int) -> np.ndarray:
        """The structure's full-size 2D mask on one slice of ``plane``."""
        return s.crop.section(PLANES.index(plane), index)

    def render(self, plane: str, index: int, window: str = "soft",
               visible: Sequence[int] | None = None) -> np.ndarray:
        """One slice as an RGB array with its orientation letters.

        ``visible`` lists the indices (into :attr:`structures`) to outline;
        None outlines all. Raises ValueError for an unknown plane, window or index.
        """
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {sorted(WINDOWS)}")
        count = self.counts[plane]
        if not 0 <= index < count:
            raise ValueError(f"{plane} slice {index} is outside 0..{count - 1}")
        chosen = [self.structures[i] for i in (range(len(self.structures))
                                               if visible is None else visible)
                  if 0 <= i < len(self.structures)]
        masks = [self._plane_mask(s, plane, index) for s in chosen]
        colors = [s.color for s in chosen]
        z, y, x = self.hu.shape
        if plane == "axial":
            hu2d, rows, cols = self.hu[index], np.arange(y), np.arange(x)
        else:
            hu2d = self.hu[:, index, :] if plane == "coronal" else self.hu[:, :, index]
            # head at the top; slices resampled to square millimetre pixels
            z_coords = self.coords[0]
            rows = _axis_samples((float(z_coords[0]), float(z_coords[-1])), z_coords,
                                 self.step_mm)[::-1]
            cols = np.arange(x) if plane == "coronal" else np.arange(y)
        image = _panel(hu2d, masks, colors, rows, cols, WINDOWS[window])
        return _labelled(image, *_LETTERS[plane])

    def png(self, plane: str, index: int, window: str = "soft",
            visible: Sequence[int] | None = None) -> bytes:
        return encode_png(self.render(plane, index, window, visible))


class ViewerCache:
    """The most recently viewed jobs, loaded once each (loading reads the whole series).

    ``load`` builds a job's viewer, or returns None when its data is gone
    (purged by retention). Concurrent requests for one job wait for one load.
    """

    def __init__(self, load: Callable[[int], JobViewer | None], size: int = 2) -> None:
        self._load = load
        self._size = size
        self._viewers: OrderedDict[int, JobViewer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: int) -> JobViewer | None:
        with self._lock:
            if job_id in self._viewers:
                self._viewers.move_to_end(job_id)
                return self._viewers[job_id]
            viewer = self._load(job_id)
            if viewer is not None:  # a job without its files yet may have them next time
                self._viewers[job_id] = viewer
                while len(self._viewers) > self._size:
                    self._viewers.popitem(last=False)
            return viewer

    def forget(self, job_id: int) -> None:
        with self._lock:
            self._viewers.pop(job_id, None)
