"""The weight-free CT engine: structures that CT physics alone defines well.

External (body outline without couch, immobilisation or air), Lung_L,
Lung_R and Lungs (trachea and main bronchi excluded), Trachea and Bronchus,
Bones and SpinalCanal, from Hounsfield thresholds and morphology on
numpy/scipy. Masks are ``(z, y, x)`` on the volume's grid. Left and right
are decided in patient coordinates (LPS: +x is the patient's left) through
each slice's own geometry, and the couch side from PatientPosition, so HFS,
HFP, FFS and FFP series all come out right. The steps live in ``ct_body``,
``ct_lungs``, ``ct_bones`` and ``ct_canal``; this module runs each once.

Each step works inside the bounding box of what it looks at, so a pelvis
costs nothing for lungs and a 150-slice 512x512 thorax takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.ct_body import BODY_HU, external, midlines, patient_x
from oncoseg_node.contouring.engines.ct_bones import Skeleton
from oncoseg_node.contouring.engines.ct_canal import spinal_canal
from oncoseg_node.contouring.engines.ct_lungs import (
    GAS_HU,
    LUNG_HU,
    MIN_LUNG_CC,
    LungsAndAirways,
    lungs,
)
from oncoseg_node.contouring.engines.postprocess import postprocess
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

__all__ = ["BODY_HU", "GAS_HU", "LUNG_HU", "MIN_LUNG_CC", "ClassicalEngine", "bones_and_canal",
           "external", "lungs", "midlines", "patient_x"]



def bones_and_canal(volume: Volume, body: np.ndarray, mid: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Skeleton (marrow included, contrast and metal left out) and the spinal canal."""
    skeleton = Skeleton(volume, body)
    canal = np.zeros(volume.shape, dtype=bool)
    if skeleton.box is None:
        return skeleton.bones, canal
    canal[skeleton.box] = spinal_canal(volume, skeleton.solid, skeleton.hu, skeleton.box, mid)
    return skeleton.fill(volume, canal[skeleton.box]), canal


class _Steps:
    """Each step at most once per volume, and only when a structure needs it."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @cached_property
    def body(self) -> np.ndarray:
        return external(self.volume)

    @cached_property
    def mid(self) -> np.ndarray:
        return midlines(self.volume, self.body)

    @cached_property
    def chest(self) -> LungsAndAirways:
        return LungsAndAirways(self.volume, self.body, self.mid)

    @cached_property
    def skeleton(self) -> tuple[np.ndarray, np.ndarray]:
        return bones_and_canal(self.volume, self.body, self.mid)


class ClassicalEngine:
    """Engine protocol implementation with no model weights."""

    name = "classical"
    SUPPORTED = ("External", "Lung_L", "Lung_R", "Lungs", "Trachea", "Bronchus", "Bones",
                 "SpinalCanal")

    @property
    def description(self) -> str:
        return "classical CT thresholds and morphology (no model weights)"

    def supports(self, structure: Structure) -> bool:
        return structure.name in self.SUPPORTED

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        steps = _Steps(volume)
        builders: dict[str, Callable[[], np.ndarray]] = {
            "External": lambda: steps.body,
            "Lung_L": lambda: steps.chest.left,
            "Lung_R": lambda: steps.chest.right,
            "Lungs": lambda: steps.chest.both(),
            "Trachea": lambda: steps.chest.trachea,
            "Bronchus": lambda: steps.chest.bronchus,
            "Bones": lambda: steps.skeleton[0],
            "SpinalCanal": lambda: steps.skeleton[1],
        }
        results = []
        for structure in structures:
            if structure.name not in builders:
                results.append(StructureResult(structure.name, None,
                                               note="not supported by the classical engine"))
                continue
            mask = postprocess(volume, builders[structure.name](), structure.postprocess)
            if not mask.any():
                results.append(StructureResult(structure.name, None,
                                               note="not found in this series"))
                continue
            results.append(StructureResult(structure.name, mask))
        return results
