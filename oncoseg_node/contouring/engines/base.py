"""The engine interface every segmentation engine implements.

An engine is built once (weights loaded, device checked) and then
``segment()`` is pure: the same volume and structures give the same masks.
Masks are boolean ``(z, y, x)`` arrays on the volume's own grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume


@dataclass(frozen=True, eq=False)
class StructureResult:
    """One structure's outcome.

    ``mask`` is None when the structure was not found (``absent``); the reason
    and any score are kept so the job record and QA page can show them.
    ``flags`` are human-readable sanity warnings (volume out of range, low
    score, ...); they never stop delivery but are shown to reviewers.
    """

    name: str
    mask: np.ndarray | None
    score: float | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def absent(self) -> bool:
        return self.mask is None or not bool(self.mask.any())

    @property
    def found_mask(self) -> np.ndarray:
        """The mask of a structure that was found; asking an absent one is a bug."""
        if self.mask is None:
            raise ValueError(f"{self.name} was not found: it has no mask")
        return self.mask


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
