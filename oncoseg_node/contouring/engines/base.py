"""The engine interface every segmentation engine implements.

An engine is built once (weights loaded, device checked) and then
``segment()`` is pure: the same volume and structures give the same masks.
Masks are boolean ``(z, y, x)`` arrays on the volume's own grid, held in a
result as their bounding-box crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume


@dataclass(frozen=True, eq=False, init=False)
class StructureResult:
    """One structure's outcome.

    The mask is held as a :class:`MaskCrop` (its bounding box on the volume's
    grid): ``StructureResult(name, full_mask)`` crops a full ``(z, y, x)``
    array, so an engine may hand over either. ``crop`` is None when the
    structure was not found (``absent``); the reason and any score are kept so
    the job record and QA page can show them. ``flags`` are human-readable
    sanity warnings (volume out of range, low score, ...); they never stop
    delivery but are shown to reviewers.
    """

    name: str
    crop: MaskCrop | None
    score: float | None
    flags: tuple[str, ...]
    note: str

    def __init__(self, name: str, mask: np.ndarray | MaskCrop | None,
                 score: float | None = None, flags: tuple[str, ...] = (),
                 note: str = "") -> None:
        crop = mask if mask is None or isinstance(mask, MaskCrop) else MaskCrop.of(mask)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "flags", tuple(flags))
        object.__setattr__(self, "note", note)

    @property
    def absent(self) -> bool:
        return self.crop is None or self.crop.empty

    @property
    def found_crop(self) -> MaskCrop:
        """The crop of a structure that was found; asking an absent one is a bug."""
        if self.crop is None:
            raise ValueError(f"{self.name} was not found: it has no mask")
        return self.crop

    @property
    def mask(self) -> np.ndarray | None:
        """The full ``(z, y, x)`` mask, allocated on each access (None if not found).

        For tests and commissioning metrics that need the whole grid; the
        delivery path (sanity, summary, writer, QA, viewer) reads ``crop``.
        """
        return None if self.crop is None else self.crop.full()

    def with_flags(self, flags: tuple[str, ...]) -> StructureResult:
        return StructureResult(self.name, self.crop, self.score, flags, self.note)


@runtime_checkable
class Engine(Protocol):
    """What the worker needs from an engine."""

    name: str

    @property
    def description(self) -> str:
        """Engine and model identity for ROIGenerationDescription (e.g. weights hash)."""
        ...

    def supports(self, structure: Structure) -> bool:
        """Whether this engine can contour ``structure`` at all."""
        ...

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        """Contour each structure; one result per structure, in order."""
        ...
