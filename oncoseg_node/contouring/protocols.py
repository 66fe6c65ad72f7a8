"""Protocols and the structure library: which OARs to contour for which series.

Pure data: no torch, no engines. A protocols file holds a ``structures``
library (TG-263 name -> colour, type, engine, prompts, ...) and ``protocols``
that match series by DICOM attributes and list library structures.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncoseg_node.errors import ConfigError
from oncoseg_node.yamlfile import line_index, located, read_yaml, unknown_key

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
TOP_LEVEL_KEYS = frozenset({"structures", "protocols", "fallback"})
PROTOCOL_KEYS = frozenset({"name", "priority", "match", "structures", "shadow"})
MATCH_KEYS = frozenset({"attributes", "calling_aets", "slice_thickness_mm"})
PARTS = ("one", "many")


@dataclass(frozen=True)
class PostProcess:
    """Mask clean-up applied after the engine, before contouring."""

    keep_components: int | None = None
    fill_holes: bool = False
    smoothing_mm: float = 0.0
    min_island_cc: float = 0.0
    # Fragments of a slice smaller than this (mm^2) are dropped: specks a
    # planning system would show as separate contours to review.
    min_slice_island_mm2: float = 0.0


@dataclass(frozen=True)
class Structure:
    """One OAR as the physicists define it.

    ``laterality`` ("left"/"right") is the patient's side, resolved from
    patient coordinates (LPS: +x is the patient's left), never from the image.
    ``hu_window`` is the window of intensity-based box prompts only;
    ``model_window`` is what a SAM3 model is shown instead of its training
    window (rarely wanted: each distinct one costs a pass over the series).
    ``parts`` is ``many`` for a structure made of separate pieces (bowel
    loops, vertebrae): every instance is followed, not only the best one.
    """

    name: str
    color: tuple[int, int, int]
    interpreted_type: str = "ORGAN"
    engine: str = "classical"
    concepts: tuple[str, ...] = ()
    negative_concepts: tuple[str, ...] = ()
    laterality: str | None = None
    volume_cc: tuple[float, float] | None = None
    hu_window: tuple[float, float] | None = None
    model_window: tuple[float, float] | None = None
    parts: str = "one"
    postprocess: PostProcess = field(default_factory=PostProcess)


@dataclass(frozen=True)
class MatchRules:
    """Regular expressions on DICOM attributes; all given rules must match."""

    attributes: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    calling_aets: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = None

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


def _structure(name: str, raw: Mapping[str, Any], problems: list[str]) -> Structure | None:
    color = raw.get("color")
    if (
        not isinstance(color, (list, tuple))
        or len(color) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    ):
        problems.append(f"structures.{name}.color: {color!r} is not [R, G, B] in 0..255")
        return None
    itype = str(raw.get("type", "ORGAN")).upper()
    if itype not in INTERPRETED_TYPES:
        problems.append(f"structures.{name}.type: {itype!r} is not an RTROIInterpretedType")
    engine = str(raw.get("engine", "classical"))
    if engine not in ENGINES:
        problems.append(f"structures.{name}.engine: {engine!r} is not one of {sorted(ENGINES)}")
    known = {"color", "type", "engine", "concepts", "negative_concepts", "laterality",
             "volume_cc", "hu_window", "model_window", "parts", "postprocess"}
    for key in sorted(set(raw) - known):
        problems.append(unknown_key(f"structures.{name}.{key}", key, known))
    laterality = raw.get("laterality")
    if laterality not in (None, "left", "right"):
        problems.append(f"structures.{name}.laterality: {laterality!r} is not left or right")
    parts = raw.get("parts", "one")
    if parts not in PARTS:
        problems.append(f"structures.{name}.parts: {parts!r} is not one or many")
        parts = "one"
    ranges: dict[str, tuple[float, float] | None] = {}
    for key in ("volume_cc", "hu_window", "model_window"):
        value = raw.get(key)
        if value is None:
            ranges[key] = None
        elif (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) for v in value) and value[0] < value[1]):
            ranges[key] = (float(value[0]), float(value[1]))
        else:
            problems.append(f"structures.{name}.{key}: {value!r} is not [low, high]")
            ranges[key] = None
    post_raw = raw.get("postprocess") or {}
    post = {}
    if not isinstance(post_raw, dict):
        problems.append(f"structures.{name}.postprocess: {post_raw!r} is not a mapping")
        post_raw = {}
    for key, value in sorted(post_raw.items()):
        problem = _postprocess_problem(key, value)
        if problem:
            problems.append(f"structures.{name}.postprocess.{key}: {problem}")
        else:
            post[key] = value
    return Structure(
        name=name,
        color=(color[0], color[1], color[2]),
        interpreted_type=itype,
        engine=engine,
        concepts=tuple(raw.get("concepts", ()) or ()),
        negative_concepts=tuple(raw.get("negative_concepts", ()) or ()),
        laterality=laterality,
        volume_cc=ranges["volume_cc"],
        hu_window=ranges["hu_window"],
        model_window=ranges["model_window"],
        parts=parts,
        postprocess=PostProcess(**post),
    )


def _postprocess_problem(key: str, value: object) -> str | None:
    """Why a postprocess setting is refused, or None when it is valid."""
    if key == "keep_components":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)
                               and value >= 1)
        return None if ok else f"{value!r} is not a whole number of at least 1"
    if key == "fill_holes":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if key in ("smoothing_mm", "min_island_cc", "min_slice_island_mm2"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return None if ok else f"{value!r} is not a number >= 0"
    return "unknown key"


TG263_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_^]{0,15}$")


def _shadowing(protocols: list[Protocol]) -> list[str]:
    """Protocols that can never be chosen because another one always wins first."""
    problems = []
    ranked = sorted(protocols, key=lambda p: -p.priority)
    for i, later in enumerate(ranked):
        for earlier in ranked[:i]:
            earlier_rules = ({k: v.pattern for k, v in earlier.match.attributes.items()},
                             earlier.match.calling_aets, earlier.match.slice_thickness_mm)
            later_rules = ({k: v.pattern for k, v in later.match.attributes.items()},
                           later.match.calling_aets, later.match.slice_thickness_mm)
            if earlier_rules == ({}, (), None) or earlier_rules == later_rules:
                problems.append(f"protocols.{later.name}: can never match, protocol "
                                f"{earlier.name!r} (priority {earlier.priority}) always wins "
                                "first with the same or no rules")
                break
    return problems


def load_protocols(path: Path, max_roi_name_length: int | None = None) -> ProtocolSet:
    """Parse and validate a protocols file; every problem is collected.

    Each problem is reported as ``FILE:LINE: key: message``.
    ``max_roi_name_length`` is the tightest limit among the destinations.
    """
    raw, text = read_yaml(Path(path))
    problems: list[str] = []
    library: dict[str, Structure] = {}
    for key in sorted(set(raw) - TOP_LEVEL_KEYS, key=str):
        problems.append(unknown_key(str(key), key, TOP_LEVEL_KEYS))
    # Wrong shapes are reported here and skipped below, never a traceback.
    if not isinstance(raw.get("structures") or {}, dict):
        problems.append("structures: expected a mapping of structure name -> fields")
        raw["structures"] = {}
    if not isinstance(raw.get("protocols") or [], list):
        problems.append("protocols: expected a list of protocols")
        raw["protocols"] = []
    for name, spec in list((raw.get("structures") or {}).items()):
        if spec is not None and not isinstance(spec, dict):
            problems.append(f"structures.{name}: expected a mapping of fields, got {spec!r}")
            raw["structures"][name] = {}
    for index, entry in enumerate(list(raw.get("protocols") or [])):
        if not isinstance(entry, dict):
            problems.append(f"protocols[{index}]: expected a mapping with name, match and "
                            f"structures, got {entry!r}")
            raw["protocols"][index] = {}
    for name in (raw.get("structures") or {}):
        if not TG263_NAME.match(str(name)):
            problems.append(f"structures.{name}: {name!r} breaks TG-263 naming (a letter, then "
                            "letters, digits, _ or ^, at most 16 characters)")
        elif max_roi_name_length is not None and len(str(name)) > max_roi_name_length:
            problems.append(f"structures.{name}: longer than {max_roi_name_length} characters, "
                            "the limit of a configured destination")
    # A structure refused above is reported once, not again by each protocol using it.
    refused: set[str] = set()
    for name, spec in (raw.get("structures") or {}).items():
        structure = _structure(str(name), spec or {}, problems)
        if structure is not None:
            library[str(name)] = structure
        else:
            refused.add(str(name))
    protocols = []
    seen: set[str] = set()
    for index, entry in enumerate(raw.get("protocols") or []):
        pname = str(entry.get("name", f"#{index}"))
        attributes = {}
        match_raw = entry.get("match") or {}
        for keyword, pattern in (match_raw.get("attributes") or {}).items():
            try:
                attributes[keyword] = re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                problems.append(f"protocols.{pname}.match.attributes.{keyword}: {exc}")
        structures = []
        listed = entry.get("structures") or []
        for sname in sorted({n for n in listed if listed.count(n) > 1}):
            problems.append(f"protocols.{pname}.structures: {sname!r} listed twice")
        for key in sorted(set(entry) - PROTOCOL_KEYS):
            problems.append(unknown_key(f"protocols.{pname}.{key}", key, PROTOCOL_KEYS))
        for sname in listed:
            if sname in refused:
                continue
            if sname not in library:
                problems.append(f"protocols.{pname}.structures: unknown structure {sname!r}")
            else:
                structures.append(library[sname])
        for key in sorted(set(match_raw) - MATCH_KEYS):
            problems.append(unknown_key(f"protocols.{pname}.match.{key}", key, MATCH_KEYS))
        thickness = match_raw.get("slice_thickness_mm")
        if thickness is not None and not (
                isinstance(thickness, list) and len(thickness) == 2
                and all(isinstance(v, (int, float)) for v in thickness)
                and thickness[0] <= thickness[1]):
            problems.append(f"protocols.{pname}.match.slice_thickness_mm: {thickness!r} is not "
                            "[min, max] with min <= max (the rule could never match)")
            thickness = None
        if pname in seen:
            problems.append(f"protocols.{pname}: name used twice")
        seen.add(pname)
        protocols.append(
            Protocol(
                name=pname,
                priority=int(entry.get("priority", 0)),
                match=MatchRules(
                    attributes=attributes,
                    calling_aets=tuple(match_raw.get("calling_aets") or ()),
                    slice_thickness_mm=(float(thickness[0]), float(thickness[1]))
                    if thickness else None),
                structures=tuple(structures),
                shadow=bool(entry.get("shadow", False)),
            )
        )
    if not protocols:
        # Also what a file caught mid-write looks like: never run with nothing.
        problems.append("protocols: no protocol defined")
    problems.extend(_shadowing(protocols))
    fallback = raw.get("fallback")
    if fallback is not None and fallback not in {p.name for p in protocols}:
        problems.append(f"fallback: {fallback!r} is not a protocol")
    if problems:
        raise ConfigError(located(problems, Path(path), line_index(text)), source=str(path))
    return ProtocolSet(
        protocols=tuple(protocols),
        library=library,
        fallback=fallback,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        source=str(path),
    )
