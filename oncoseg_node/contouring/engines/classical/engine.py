"""The weight-free CT engine: structures that CT physics alone defines well.

External (body outline without couch, immobilisation or air), Lung_L,
Lung_R and Lungs (trachea and main bronchi excluded), Trachea and Bronchus,
Bones and SpinalCanal, from Hounsfield thresholds and morphology on
numpy/scipy. Masks are ``(z, y, x)`` on the volume's grid. Left and right
are decided in patient coordinates (LPS: +x is the patient's left) through
each slice's own geometry, and the couch side from PatientPosition, so HFS,
HFP, FFS and FFP series all come out right. The steps live in ``body``,
``lungs``, ``bones`` and ``canal``; this module runs each once.

Each step works inside the bounding box of what it looks at, so a pelvis
costs nothing for lungs and a 150-slice 512x512 thorax takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.classical.blocks import Block, packed_block
from oncoseg_node.contouring.engines.classical.body import (
    BODY_HU,
    external,
    external_block,
    midlines,
    patient_x,
)
from oncoseg_node.contouring.engines.classical.bones import Skeleton
from oncoseg_node.contouring.engines.classical.canal import spinal_canal
from oncoseg_node.contouring.engines.classical.lungs import (
    GAS_HU,
    LUNG_HU,
    MIN_LUNG_CC,
    LungsAndAirways,
)
from oncoseg_node.contouring.engines.classical.postprocess import postprocess_block
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

__all__ = ["BODY_HU", "GAS_HU", "LUNG_HU", "MIN_LUNG_CC", "ClassicalEngine", "bones_and_canal",
           "external", "midlines", "patient_x", "skeleton_blocks"]



def skeleton_blocks(volume: Volume, body: Block, mid: np.ndarray
                    ) -> tuple[Block | None, Block | None]:
    """Skeleton (marrow included, contrast and metal left out) and the spinal canal,
    each on its own box (None when empty): never a whole volume of either."""
    skeleton = Skeleton(volume, body)
    bone = skeleton.bone
    if bone is None:
        return None, None
    canal = spinal_canal(bone, skeleton.solid, mid)
    bones = skeleton.fill(canal)
    del skeleton
    return bone.tight(bones), bone.tight(canal)


def bones_and_canal(volume: Volume, body: np.ndarray, mid: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`skeleton_blocks` as whole masks."""
    bones, canal = skeleton_blocks(volume, Block.whole(body), mid)
    nothing = np.zeros(volume.shape, dtype=bool)
    return (nothing if bones is None else bones.full(volume.shape),
            nothing.copy() if canal is None else canal.full(volume.shape))


class _Steps:
    """Each step at most once per volume, and only when a structure needs it.

    Outputs are held as blocks (their box only); :meth:`release` drops a step
    once no structure left needs it, so its memory goes before the next step.
    External waits for the later steps as bits, an eighth of its block.
    """

    def __init__(self, volume: Volume, names: Sequence[str] | None = None) -> None:
        self.volume = volume
        # The airways cost a third of the chest step: found only when asked for.
        self.airways = names is None or bool({"Trachea", "Bronchus"} & set(names))

    @cached_property
    def body(self) -> Block:
        """External as bits on its box (empty when the series holds no body)."""
        return packed_block(external_block(self.volume))

    @cached_property
    def mid(self) -> np.ndarray:
        return midlines(self.volume, self.body)

    @cached_property
    def chest(self) -> LungsAndAirways:
        return LungsAndAirways(self.volume, self.body, self.mid, airways=self.airways)

    @cached_property
    def skeleton(self) -> tuple[Block | None, Block | None]:
        return skeleton_blocks(self.volume, self.body, self.mid)

    def release(self, name: str) -> None:
        self.__dict__.pop(name, None)


# What each structure is built from, in the order the steps run: a structure
# is contoured with the others of its step, so each step's memory is freed
# before the next one starts; results keep the protocol's order.
_BUILDERS: dict[str, tuple[str, Callable[[_Steps], Block | None]]] = {
    "External": ("body", lambda steps: steps.body.unpack()),
    "Lung_L": ("chest", lambda steps: steps.chest.block("left")),
    "Lung_R": ("chest", lambda steps: steps.chest.block("right")),
    "Lungs": ("chest", lambda steps: steps.chest.both_block()),
    "Trachea": ("chest", lambda steps: steps.chest.block("trachea")),
    "Bronchus": ("chest", lambda steps: steps.chest.block("bronchus")),
    "Bones": ("skeleton", lambda steps: steps.skeleton[0]),
    "SpinalCanal": ("skeleton", lambda steps: steps.skeleton[1]),
}
_STEP_ORDER = ("body", "chest", "skeleton")
# What _Steps holds, and the steps that use it: kept until the last of them has run.
_HELD_FOR = {"body": ("chest", "skeleton"), "mid": ("chest", "skeleton"), "chest": ("chest",),
             "skeleton": ("skeleton",)}


class ClassicalEngine:
    """Engine protocol implementation with no model weights."""

    name = "classical"
    SUPPORTED = tuple(_BUILDERS)

    @property
    def description(self) -> str:
        return "classical CT thresholds and morphology (no model weights)"

    def supports(self, structure: Structure) -> bool:
        return structure.name in self.SUPPORTED

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        steps = _Steps(volume, [s.name for s in structures])
        results: dict[int, StructureResult] = {}
        # Each found mask waits as bits, on its bounding box, for the steps after its
        # own: at 400 slices External is 58 MiB of booleans, 7 MiB of bits.
        waiting: dict[int, Block] = {}
        for index, structure in enumerate(structures):
            if structure.name not in _BUILDERS:
                results[index] = StructureResult(structure.name, None,
                                                 note="not supported by the classical engine")
        wanted = [(i, s) for i, s in enumerate(structures) if s.name in _BUILDERS]
        needed = {_BUILDERS[s.name][0] for _, s in wanted}
        for step in _STEP_ORDER:
            for index, structure in wanted:
                if _BUILDERS[structure.name][0] != step:
                    continue
                block = postprocess_block(volume, _BUILDERS[structure.name][1](steps),
                                          structure.postprocess)
                found = None if block is None else block.tightened(volume.shape)
                del block
                if found is None:
                    results[index] = StructureResult(structure.name, None,
                                                     note="not found in this series")
                else:
                    waiting[index] = found.packed()
                del found
            needed.discard(step)
            for held, users in _HELD_FOR.items():
                if not needed & set(users):
                    steps.release(held)
        del steps
        for index, mask in waiting.items():
            results[index] = StructureResult(structures[index].name, mask.crop(volume.shape))
        return [results[i] for i in range(len(structures))]
