"""Type 1 attributes of the RT Structure Set IOD: present and not empty.

Part of the writer's self-check: a structure set whose Study Instance UID is
empty (a CT from an anonymising export) is refused by dciodvfy and by some
planning systems, and references nothing. Each entry is a path of keywords;
a sequence keyword in a path means "in every item of that sequence". Only
the Type 1 attributes of modules we write are listed; a Type 1 attribute of
an optional (Type 3) sequence is checked in each item the sequence has.

Contour items (``ContourSequence``) are checked by the writer's own contour
check, which reads their encoded bytes without decoding every item.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

# (path to the attribute, required): required means the attribute must be
# present at all; otherwise it is checked only where it appears (Type 1C, or
# Type 1 inside a module or sequence we may leave out).
RTSTRUCT_TYPE1: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("SOPClassUID",), True),
    (("SOPInstanceUID",), True),
    (("SpecificCharacterSet",), False),
    (("StudyInstanceUID",), True),
    (("SeriesInstanceUID",), True),
    (("Modality",), True),
    (("FrameOfReferenceUID",), False),
    (("StructureSetLabel",), True),
    (("ApprovalStatus",), True),
    (("ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "ReferencedSOPClassUID"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "ReferencedSOPInstanceUID"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "RTReferencedSeriesSequence"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "RTReferencedSeriesSequence", "SeriesInstanceUID"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "RTReferencedSeriesSequence", "ContourImageSequence"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "RTReferencedSeriesSequence", "ContourImageSequence", "ReferencedSOPClassUID"), False),
    (("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
      "RTReferencedSeriesSequence", "ContourImageSequence", "ReferencedSOPInstanceUID"),
     False),
    (("PredecessorStructureSetSequence", "ReferencedSOPClassUID"), False),
    (("PredecessorStructureSetSequence", "ReferencedSOPInstanceUID"), False),
    (("StructureSetROISequence",), True),
    (("StructureSetROISequence", "ROINumber"), False),
    (("StructureSetROISequence", "ReferencedFrameOfReferenceUID"), False),
    (("ROIContourSequence",), True),
    (("ROIContourSequence", "ReferencedROINumber"), False),
    (("RTROIObservationsSequence",), True),
    (("RTROIObservationsSequence", "ObservationNumber"), False),
    (("RTROIObservationsSequence", "ReferencedROINumber"), False),
)


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, DicomSequence):
        return len(value) == 0
    if isinstance(value, (str, bytes)):
        return value.strip(" \0") == "" if isinstance(value, str) else value.strip(b" \0") == b""
    try:
        return len(value) == 0
    except TypeError:
        return False


def _walk(ds: Dataset, path: tuple[str, ...], required: bool, where: str
          ) -> Iterator[str]:
    keyword, rest = path[0], path[1:]
    label = f"{where}{keyword}"
    if keyword not in ds:
        if required:
            yield f"{label} missing"
        return
    value = ds[keyword].value
    if not rest:
        if _is_empty(value):
            yield f"{label} empty"
        return
    # An empty Type 1 sequence on the way is reported by its own entry.
    for index, item in enumerate(value or []):
        yield from _walk(item, rest, True, f"{label}[{index}].")


def type1_problems(ds: Dataset) -> list[str]:
    """Every Type 1 attribute of ``ds`` that is missing or empty, by its path.

    The same finding in many items is reported once with its count, e.g.
    ``...ContourImageSequence[*].ReferencedSOPInstanceUID empty (96 items)``.
    """
    found: Counter[str] = Counter()
    for path, required in RTSTRUCT_TYPE1:
        for problem in _walk(ds, path, required, ""):
            found[re.sub(r"\[\d+\]", "[*]", problem)] += 1
    return [f"Type 1 {problem}" + (f" ({n} items)" if n > 1 else "")
            for problem, n in found.items()]
