"""Builds the engines a config asks for; the SAM3 stack is imported only here, lazily.

The classical engine is always present (it needs no weights). SAM3 is built
only when ``engine.name`` is ``sam3``; its failures (missing weights, no
GPU) are startup errors, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from oncoseg_node.config import EngineConfig
from oncoseg_node.contouring.engines.base import Engine, StructureResult
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume


class EngineSet:
    """Routes each structure to the engine its protocol entry names."""

    def __init__(self, engines: dict[str, Engine]) -> None:
        self.engines = engines

    @property
    def description(self) -> str:
        return "; ".join(f"{e.name}: {e.description}" for e in self.engines.values())

    def describe_for(self, structures: Sequence[Structure]) -> str:
        used = {s.engine for s in structures if s.engine in self.engines}
        return "; ".join(
            f"{name}: {self.engines[name].description}" for name in sorted(used)
        ) or self.description

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        by_engine: dict[str, list[int]] = {}
        results: list[StructureResult | None] = [None] * len(structures)
        for i, structure in enumerate(structures):
            engine = self.engines.get(structure.engine)
            if engine is None:
                results[i] = StructureResult(
                    structure.name, None,
                    note=f"engine {structure.engine!r} is not configured on this node")
            elif not engine.supports(structure):
                results[i] = StructureResult(
                    structure.name, None,
                    note=f"not supported by the {structure.engine} engine")
            else:
                by_engine.setdefault(structure.engine, []).append(i)
        for name, indices in by_engine.items():
            outputs = self.engines[name].segment(volume, [structures[i] for i in indices])
            for i, result in zip(indices, outputs, strict=True):
                results[i] = result
        return [r for r in results if r is not None]


def contourable(config: EngineConfig) -> Callable[[Structure], bool]:
    """Whether a structure would be contoured by the engines ``config`` builds.

    Answers without building any engine (no weights, no torch): the
    classical engine's fixed list, and for SAM3, configured, any structure
    with a text concept, which is what it prompts with.
    """
    from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine

    def can(structure: Structure) -> bool:
        if structure.engine == "classical":
            return structure.name in ClassicalEngine.SUPPORTED
        if structure.engine == "sam3" and config.name == "sam3":
            return any(c.strip() for c in structure.concepts)
        return False

    return can


def build_engines(config: EngineConfig) -> EngineSet:
    """Load the configured engines once, at startup."""
    from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine

    engines: dict[str, Engine] = {"classical": ClassicalEngine()}
    if config.name == "sam3":
        from oncoseg_node.contouring.engines.sam3.engine import (
            Sam3Engine,  # torch and transformers load only on this path
        )
        from oncoseg_node.contouring.engines.sam3.prompts import box_prompts

        engines["sam3"] = Sam3Engine.from_config(config.sam3, box_prompter=box_prompts)
    return EngineSet(engines)
