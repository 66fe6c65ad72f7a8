"""Per-structure prompting on the tiny random SAM3: ``text``, ``text+boxes`` and ``boxes``.

The weights are random (``tests/sam3_tiny.py``): these tests check what
reaches the model and that a mask comes back, never its quality. The boxes
come from the real intensity prompter on the phantom's bright organ.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.prompts import (  # noqa: E402
    IntensityBoxPrompter,
    PromptSpec,
)
from oncoseg_node.contouring.engines.sam3.select import BOXES_ONLY_TEXT  # noqa: E402
from oncoseg_node.contouring.protocols import Structure  # noqa: E402
from tests.sam3_cases import (  # noqa: E402, F401  - fixtures are found by name
    cpu_config,
    one_thread,
    phantom,
    tiny_dir,
)

# The phantom's organ (300 HU on slices 1-4) is under a cc: a recipe that keeps it.
ORGAN_SPEC = PromptSpec((200.0, 1000.0), opening_mm=0.0, min_cc=0.1, min_area_mm2=5.0)
ORGAN = Structure("Organ", (1, 2, 3), engine="sam3", concepts=("liver",),
                  hu_window=(200.0, 1000.0), prompt="boxes")


class Inputs:
    """What the detector and the text encoder are called with (forward hooks)."""

    def __init__(self, engine: Sam3Engine) -> None:
        self.detector: list[dict[str, Any]] = []
        self.texts: list[str] = []
        detector = engine.model.detector_model
        detector.register_forward_hook(self._detector, with_kwargs=True)
        detector.text_encoder.register_forward_hook(self._text, with_kwargs=True)
        self.tokenizer = engine.tokenizer

    def _detector(self, module, args, kwargs, out) -> None:
        self.detector.append(kwargs)

    def _text(self, module, args, kwargs, out) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.texts += self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def boxes_engine(tiny_dir: Path) -> tuple[Sam3Engine, IntensityBoxPrompter]:
    prompter = IntensityBoxPrompter(specs={"Organ": ORGAN_SPEC})
    return Sam3Engine.from_config(cpu_config(tiny_dir), box_prompter=prompter), prompter


def test_boxes_only_sends_the_boxes_and_no_concept_text(tiny_dir: Path):
    engine, prompter = boxes_engine(tiny_dir)
    volume = phantom()
    expected = prompter(volume, ORGAN)
    assert expected is not None and sorted(expected) == [1, 2, 3, 4]
    seen = Inputs(engine)
    (result,) = engine.segment(volume, [ORGAN])
    # the structure's concept never reaches the text encoder: only SAM3's placeholder
    assert [t.strip() for t in seen.texts] == [BOXES_ONLY_TEXT]
    # every detector call carries boxes, and only the boxed slices are prompted
    assert seen.detector and all(k.get("input_boxes") is not None for k in seen.detector)
    assert sum(k["input_boxes"].shape[0] for k in seen.detector) == len(expected)
    placeholder, _ = engine._text(BOXES_ONLY_TEXT)
    for kwargs in seen.detector:
        sent = kwargs["text_embeds"].pooler_output
        assert torch.equal(sent, placeholder.expand(sent.shape[0], -1, -1))
        assert bool((kwargs["input_boxes_labels"] == 1).any())
    assert result.mask is not None and result.mask.shape == volume.shape
    assert result.mask.any() and "slices" in result.note


def test_boxes_only_without_concepts_is_supported(tiny_dir: Path):
    engine, _ = boxes_engine(tiny_dir)
    bare = replace(ORGAN, concepts=())
    assert engine.supports(bare)
    (result,) = engine.segment(phantom(), [bare])
    assert result.mask is not None


def test_boxes_only_where_no_box_is_found_is_absent_without_calling_the_model(tiny_dir: Path):
    engine, _ = boxes_engine(tiny_dir)
    seen = Inputs(engine)
    nowhere = replace(ORGAN, hu_window=(2000.0, 3000.0))
    (result,) = engine.segment(phantom(), [nowhere])
    assert result.absent and result.note.startswith("not found: no box prompt")
    assert seen.detector == [] and seen.texts == []


def test_text_ignores_the_window_and_text_plus_boxes_uses_it(tiny_dir: Path):
    engine, prompter = boxes_engine(tiny_dir)
    seen = Inputs(engine)
    text_only = replace(ORGAN, prompt="text")
    engine.segment(phantom(), [text_only])
    assert all(k.get("input_boxes") is None for k in seen.detector)
    assert [t.strip() for t in seen.texts] == ["liver"]
    seen.detector.clear()
    for both in (replace(ORGAN, prompt="text+boxes"), replace(ORGAN, prompt=None)):
        assert both.prompting == "text+boxes"
        engine.segment(phantom(), [both])
        boxed = [k for k in seen.detector if k.get("input_boxes") is not None]
        plain = [k for k in seen.detector if k.get("input_boxes") is None]
        assert sum(k["input_boxes"].shape[0] for k in boxed) == 4  # slices 1-4
        assert sum(k["text_embeds"].pooler_output.shape[0] for k in plain) == 2  # 0 and 5
        seen.detector.clear()
    assert BOXES_ONLY_TEXT not in engine._text_cache


def test_boxes_only_with_the_text_structures_of_the_same_pass(tiny_dir: Path):
    """A boxes-only structure beside text ones: each gets its own prompts on shared features."""
    engine, _ = boxes_engine(tiny_dir)
    seen = Inputs(engine)
    liver = Structure("Liver", (1, 2, 3), engine="sam3", concepts=("liver",))
    results = engine.segment(phantom(), [ORGAN, liver])
    assert [r.name for r in results] == ["Organ", "Liver"]
    assert sorted(t.strip() for t in seen.texts) == sorted([BOXES_ONLY_TEXT, "liver"])
    assert all(r.mask is not None for r in results)
