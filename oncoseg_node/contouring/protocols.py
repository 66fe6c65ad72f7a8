"""Protocols and the structure library: which OARs to contour for which series.

Pure data: no torch, no engines. A protocols file holds a ``structures``
library (TG-263 name -> colour, type, engine, prompts, ...) and ``protocols``
that match series by DICOM attributes and list library structures. The file
is read by the node config's parser (:class:`~oncoseg_node.yamlfile.DataclassParser`)
into the dataclasses below; what one value alone cannot show (a structure a
protocol lists, a fallback, the destinations' name limit) is checked here.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncoseg_node.errors import ConfigError
from oncoseg_node.yamlfile import DataclassParser, line_index, located, read_as, read_yaml

INTERPRETED_TYPES = frozenset(
    {
        "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR",
        "BOLUS", "AVOIDANCE", "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER",
        "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION",
        "CONTROL",
    }
)
ENGINES = frozenset({"classical", "sam3"})
PARTS = ("one", "many")
# How a SAM3 structure is prompted: its text concepts, those plus intensity-based
# boxes, or the boxes alone (for checkpoints trained without text, as Onco-Seg's was).
PROMPTS = ("text", "text+boxes", "boxes")
BOXED_PROMPTS = frozenset({"text+boxes", "boxes"})
TG263_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_^]{0,15}$")


def _must(ok: Callable[[Any], bool], what: str,
          convert: Callable[[Any], Any] = lambda raw: raw) -> Callable[[Any], Any]:
    """A field check: the value (converted) when ``ok``, else ``<value> is not <what>``."""
    def check(raw: Any) -> Any:
        value = convert(raw)
        if not ok(value):
            raise ValueError(f"{value!r} is not {what}")
        return value
    return check


def _or_empty(kind: type, problem: str) -> Callable[[Any], Any]:
    """A field check: an empty ``kind`` for a missing or empty value, else one of ``kind``."""
    def check(raw: Any) -> Any:
        if not raw:
            return kind()
        if not isinstance(raw, kind):
            raise ValueError(problem.format(raw=raw))
        return raw
    return check


def _mapping_item(what: str, *, none_ok: bool) -> Callable[[Any], Any]:
    """An item check: a mapping (or None when ``none_ok``), else ``expected <what>``."""
    def check(raw: Any) -> Any:
        if not isinstance(raw, dict) and not (none_ok and raw is None):
            raise ValueError(f"expected {what}, got {raw!r}")
        return raw
    return check


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rgb(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in value))


def _pair(ordered: Callable[[float, float], bool]) -> Callable[[Any], bool]:
    """Whether a value is None or ``[a, b]``, two numbers in ``ordered`` order."""
    def ok(value: Any) -> bool:
        return value is None or (isinstance(value, (list, tuple)) and len(value) == 2
                                 and all(isinstance(v, (int, float)) for v in value)
                                 and ordered(value[0], value[1]))
    return ok


def _tg263_name(raw: Any) -> str:
    if not TG263_NAME.match(str(raw)):
        raise ValueError(f"{raw!r} breaks TG-263 naming (a letter, then letters, digits, _ "
                         "or ^, at most 16 characters)")
    return str(raw)


def _pattern(raw: Any) -> Any:
    """Match patterns are case-insensitive: "thorax" in a rule matches "THORAX" in a header."""
    if not isinstance(raw, str):
        return raw  # the parser names the wrong type
    try:
        return re.compile(raw, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(str(exc)) from None


_NON_NEGATIVE = read_as(check=_must(lambda v: _is_number(v) and v >= 0, "a number >= 0"))
_RANGE = read_as(check=_must(_pair(operator.lt), "[low, high]"))


@dataclass(frozen=True)
class PostProcess:
    """Mask clean-up applied after the engine, before contouring."""

    keep_components: int | None = field(default=None, metadata=read_as(check=_must(
        lambda v: v is None or (_is_number(v) and isinstance(v, int) and v >= 1),
        "a whole number of at least 1")))
    fill_holes: bool = field(default=False, metadata=read_as(
        check=_must(lambda v: isinstance(v, bool), "true or false")))
    smoothing_mm: float = field(default=0.0, metadata=_NON_NEGATIVE)
    min_island_cc: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # Fragments of a slice smaller than this (mm^2) are dropped: specks a
    # planning system would show as separate contours to review.
    min_slice_island_mm2: float = field(default=0.0, metadata=_NON_NEGATIVE)


@dataclass(frozen=True)
class Structure:
    """One OAR as the physicists define it; in the file, keyed by its TG-263 ``name``.

    ``laterality`` ("left"/"right") is the patient's side, resolved from
    patient coordinates (LPS: +x is the patient's left), never from the image.
    ``hu_window`` is the window of intensity-based box prompts only;
    ``model_window`` is what a SAM3 model is shown instead of its training
    window (rarely wanted: each distinct one costs a pass over the series).
    ``parts`` is ``many`` for a structure made of separate pieces (bowel
    loops, vertebrae): every instance is followed, not only the best one.
    ``prompt`` is how a SAM3 model is asked for it: ``text`` (its concepts),
    ``text+boxes`` (concepts, plus intensity boxes from ``hu_window`` where
    they are found) or ``boxes`` (those boxes alone, no concept text: for
    checkpoints trained without text). Unset, the concepts plus whatever
    boxes the engine's prompter gives: the node's gives them only with an
    ``hu_window`` (:attr:`prompting` names the outcome).
    """

    name: str = field(metadata=read_as(check=_tg263_name))
    color: tuple[int, int, int] = field(metadata=read_as(
        check=_must(_is_rgb, "[R, G, B] in 0..255")))
    interpreted_type: str = field(default="ORGAN", metadata=read_as(key="type", check=_must(
        INTERPRETED_TYPES.__contains__, "an RTROIInterpretedType", lambda v: str(v).upper())))
    engine: str = field(default="classical", metadata=read_as(
        check=_must(ENGINES.__contains__, f"one of {sorted(ENGINES)}", str)))
    concepts: tuple[str, ...] = ()
    negative_concepts: tuple[str, ...] = ()
    laterality: str | None = field(default=None, metadata=read_as(
        check=_must(lambda v: v in (None, "left", "right"), "left or right")))
    volume_cc: tuple[float, float] | None = field(default=None, metadata=_RANGE)
    hu_window: tuple[float, float] | None = field(default=None, metadata=_RANGE)
    model_window: tuple[float, float] | None = field(default=None, metadata=_RANGE)
    parts: str = field(default="one", metadata=read_as(
        check=_must(PARTS.__contains__, "one or many")))
    postprocess: PostProcess = field(default_factory=PostProcess, metadata=read_as(
        check=_or_empty(dict, "{raw!r} is not a mapping")))
    prompt: str | None = field(default=None, metadata=read_as(check=_must(
        lambda v: v is None or v in PROMPTS, f"one of {', '.join(PROMPTS)}")))

    @property
    def prompting(self) -> str:
        """``prompt`` as set, else ``text+boxes`` with an ``hu_window`` and ``text`` without."""
        if self.prompt is not None:
            return self.prompt
        return "text+boxes" if self.hu_window is not None else "text"


def _prompt_problems(name: str, structure: Structure) -> list[str]:
    """A box prompt with no window to find its boxes in; text where no text is sent."""
    problems = []
    if structure.prompt in BOXED_PROMPTS and structure.hu_window is None:
        problems.append(f"structures.{name}.prompt: {structure.prompt} needs hu_window, "
                        "the HU window [low, high] its boxes are found in")
    if structure.prompt == "boxes" and structure.negative_concepts:
        problems.append(f"structures.{name}.negative_concepts: not used with prompt: boxes "
                        "(no text reaches the model); remove them or prompt with text")
    return problems


@dataclass(frozen=True)
class MatchRules:
    """Regular expressions on DICOM attributes; all given rules must match."""

    attributes: Mapping[str, re.Pattern[str]] = field(default_factory=dict,
                                                      metadata=read_as(each=_pattern))
    calling_aets: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = field(default=None, metadata=read_as(
        check=_must(_pair(operator.le),
                    "[min, max] with min <= max (the rule could never match)")))

    def explain(self, header: Any, calling_ae: str | None) -> list[str]:
        """Reasons this rule set does not match; empty when it matches."""
        reasons = []
        for keyword, pattern in self.attributes.items():
            value = str(header.get(keyword, "") or "")
            if not pattern.search(value):
                reasons.append(f"{keyword} {value!r} does not match /{pattern.pattern}/")
        if self.calling_aets and (calling_ae or "") not in self.calling_aets:
            reasons.append(f"calling AE {calling_ae!r} not in {list(self.calling_aets)}")
        if self.slice_thickness_mm is not None:
            lo, hi = self.slice_thickness_mm
            try:
                thickness = float(header.get("SliceThickness"))
            except (TypeError, ValueError):
                reasons.append("SliceThickness missing")
            else:
                if not lo <= thickness <= hi:
                    reasons.append(f"SliceThickness {thickness} outside [{lo}, {hi}]")
        return reasons


@dataclass(frozen=True)
class Protocol:
    name: str
    priority: int
    match: MatchRules
    structures: tuple[Structure, ...]
    shadow: bool = False  # sent only to destinations marked shadow


@dataclass(frozen=True)
class DeclaredProtocol:
    """A protocol as the file declares it: its structures by name.

    Without a ``name``, it is named by its place in the list (``#0``).
    """

    name: str = field(metadata=read_as(check=str))
    priority: int = 0
    match: MatchRules = field(default_factory=MatchRules)
    structures: tuple[str, ...] = ()
    shadow: bool = False


@dataclass(frozen=True)
class ProtocolsFile:
    """A protocols file as written; a refused structure or protocol is None in it."""

    structures: Mapping[str, Structure] = field(default_factory=dict, metadata=read_as(
        check=_or_empty(dict, "expected a mapping of structure name -> fields"),
        each=_mapping_item("a mapping of fields", none_ok=True), key_field="name"))
    protocols: tuple[DeclaredProtocol, ...] = field(default=(), metadata=read_as(
        check=_or_empty(list, "expected a list of protocols"),
        each=_mapping_item("a mapping with name, match and structures", none_ok=False),
        named_by="name"))
    fallback: str | None = None


@dataclass(frozen=True)
class ProtocolSet:
    """A validated protocols file; ``version`` is a hash of its content."""

    protocols: tuple[Protocol, ...]
    library: Mapping[str, Structure]
    fallback: str | None
    version: str
    source: str

    def by_name(self, name: str) -> Protocol:
        for protocol in self.protocols:
            if protocol.name == name:
                return protocol
        raise KeyError(name)

    def match(self, header: Any, calling_ae: str | None = None) -> Protocol | None:
        """The highest-priority matching protocol, else the fallback, else None."""
        for protocol in sorted(self.protocols, key=lambda p: -p.priority):
            if not protocol.match.explain(header, calling_ae):
                return protocol
        if self.fallback is not None:
            return self.by_name(self.fallback)
        return None


def _rules(match: MatchRules) -> tuple[object, ...]:
    """What decides whether a protocol matches, comparable between protocols."""
    return ({k: v.pattern for k, v in match.attributes.items() if v is not None},
            match.calling_aets, match.slice_thickness_mm)


def _shadowing(protocols: Sequence[DeclaredProtocol]) -> list[str]:
    """Protocols that can never be chosen because another one always wins first."""
    problems = []
    ranked = sorted(protocols, key=lambda p: -p.priority)
    for i, later in enumerate(ranked):
        for earlier in ranked[:i]:
            if _rules(earlier.match) in (({}, (), None), _rules(later.match)):
                problems.append(f"protocols.{later.name}: can never match, protocol "
                                f"{earlier.name!r} (priority {earlier.priority}) always wins "
                                "first with the same or no rules")
                break
    return problems


def _listed(protocol: DeclaredProtocol, defined: Mapping[str, object]) -> list[str]:
    """A protocol's structures listed twice or never defined.

    A defined structure refused for its own fields is not named again here.
    """
    names = [n for n in protocol.structures if isinstance(n, str)]  # others already refused
    problems = [f"protocols.{protocol.name}.structures: {name!r} listed twice"
                for name in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"protocols.{protocol.name}.structures: unknown structure {name!r}"
                 for name in names if name not in defined]
    return problems


def _cross_references(declared: ProtocolsFile, max_roi_name_length: int | None) -> list[str]:
    """What no single value shows: names used across the file, and the destinations' limit."""
    problems = []
    if max_roi_name_length is not None:
        problems += [f"structures.{name}: longer than {max_roi_name_length} characters, "
                     "the limit of a configured destination"
                     for name in declared.structures
                     if TG263_NAME.match(str(name)) and len(str(name)) > max_roi_name_length]
    for name, structure in declared.structures.items():
        if structure is not None:
            problems += _prompt_problems(str(name), structure)
    protocols = [p for p in declared.protocols if p is not None]
    seen: set[str] = set()
    for protocol in protocols:
        problems += _listed(protocol, declared.structures)
        if protocol.name in seen:
            problems.append(f"protocols.{protocol.name}: name used twice")
        seen.add(protocol.name)
    if not declared.protocols:
        # Also what a file caught mid-write looks like: never run with nothing.
        problems.append("protocols: no protocol defined")
    # A protocol whose match or priority was refused is left out: it never ranks.
    problems += _shadowing([p for p in protocols
                            if p.match is not None and isinstance(p.priority, int)])
    fallback = declared.fallback
    if fallback is not None and fallback not in [p.name for p in protocols]:
        problems.append(f"fallback: {fallback!r} is not a protocol")
    return problems


def load_protocols(path: Path, max_roi_name_length: int | None = None) -> ProtocolSet:
    """Parse and validate a protocols file; every problem is collected.

    Each problem is reported as ``FILE:LINE: key: message``.
    ``max_roi_name_length`` is the tightest limit among the destinations.
    """
    path = Path(path)
    raw, text = read_yaml(path)
    parser = DataclassParser(path.resolve().parent)
    declared: ProtocolsFile = parser.build(ProtocolsFile, raw, "")
    problems = parser.problems + _cross_references(declared, max_roi_name_length)
    if problems:
        raise ConfigError(located(problems, path, line_index(text)), source=str(path))
    library = {s.name: s for s in declared.structures.values()}
    return ProtocolSet(
        protocols=tuple(Protocol(name=p.name, priority=p.priority, match=p.match,
                                 structures=tuple(library[n] for n in p.structures),
                                 shadow=p.shadow)
                        for p in declared.protocols),
        library=library,
        fallback=declared.fallback,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        source=str(path),
    )
