"""The volume seen through a box: its HU and geometry in the box's own indices.

The chest and skeleton steps work on the bounding box of what they look
at (the lungs, the bone), with indices within that box. Slice k of the box
is slice ``box[0].start + k`` of the volume, with its own offset along the
table (slice spacing need not be uniform), and pixel (r, c) is pixel
``(r + box[1].start, c + box[2].start)``: :class:`BoxedVolume` does that
arithmetic, once, for every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oncoseg_node.contouring.engines.classical.blocks import Block, inner, rows_box
from oncoseg_node.contouring.mask_crop import Box
from oncoseg_node.contouring.volume import Volume


@dataclass(frozen=True, eq=False)
class BoxedVolume:
    """``volume`` on ``box``; every index taken or given is within the box."""

    volume: Volume
    box: Box

    @property
    def hu(self) -> np.ndarray:
        """The HU on the box as the series holds them (int16): a view, never a copy.

        Steps cast a slab to floats where they need arithmetic.
        """
        return self.volume.hu[self.box]

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = (cut.stop - cut.start for cut in self.box)
        return z, y, x

    @property
    def z0(self) -> int:
        """The volume's index of the box's first slice."""
        return int(self.box[0].start)

    def to_volume(self, z: int) -> int:
        """The volume's index of the box's slice ``z``."""
        return self.z0 + z

    def on_slices(self, per_slice: np.ndarray) -> np.ndarray:
        """The entries of ``per_slice`` (one per slice of the volume) for the box's slices."""
        return per_slice[self.box[0]]

    @property
    def slice_offsets(self) -> np.ndarray:
        """Position (mm) along the slice normal of each of the box's own slices."""
        return self.on_slices(self.volume.slice_offsets)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return self.volume.pixel_spacing

    @property
    def col_direction(self) -> np.ndarray:
        return self.volume.col_direction

    def index_to_patient(self, z: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """LPS points (n, 3) of the (fractional) pixels ``rows``, ``cols`` of box slice ``z``."""
        return self.volume.index_to_patient(self.to_volume(z), rows + self.box[1].start,
                                            cols + self.box[2].start)

    def sub(self, part: Box) -> BoxedVolume:
        """The volume on ``part``, a box given in this box's indices."""
        return BoxedVolume(self.volume, inner(self.box, part))

    def rows(self, z0: int, z1: int) -> Box:
        """The box's slices ``z0:z1`` (box indices, cut at its end) as a volume box."""
        return rows_box(self.box, slice(z0, z1))

    def image_edge(self) -> np.ndarray:
        """On the box, the pixels on the image's own edge (where the field of view cuts)."""
        edge = np.zeros(self.shape, dtype=bool)
        if self.box[1].start == 0:
            edge[:, 0] = True
        if self.box[1].stop == self.volume.shape[1]:
            edge[:, -1] = True
        if self.box[2].start == 0:
            edge[:, :, 0] = True
        if self.box[2].stop == self.volume.shape[2]:
            edge[:, :, -1] = True
        return edge

    def tight(self, mask: np.ndarray) -> Block | None:
        """``mask`` (on the box) as a block on its own bounding box; None when empty."""
        return Block(self.box, mask).tightened(self.volume.shape)
