"""Named DIMSE status codes and what they mean (PS3.4 Annex B, PS3.7 Annex C).

A status is always one of these names in code, never a bare hex literal.
"""

from __future__ import annotations

SUCCESS = 0x0000
# Storage Service Class failures (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# General failures (PS3.7 C)
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
# Storage warnings
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007

MEANINGS = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: data set does not match SOP class",
    CANNOT_UNDERSTAND: "Error: cannot understand",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    COERCION_OF_DATA_ELEMENTS: "Warning: coercion of data elements",
    ELEMENTS_DISCARDED: "Warning: elements discarded",
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "Warning: data set does not match SOP class",
}


def describe(status: int) -> str:
    """Human-readable meaning of a status, with its code in hex."""
    meaning = MEANINGS.get(status)
    if meaning is None:
        if 0xA700 <= status <= 0xA7FF:
            meaning = "Refused: out of resources"
        elif 0xA900 <= status <= 0xA9FF:
            meaning = "Error: data set does not match SOP class"
        elif 0xC000 <= status <= 0xCFFF:
            meaning = "Error: cannot understand"
        elif 0xB000 <= status <= 0xBFFF:
            meaning = "Warning"
        else:
            meaning = "Failure"
    return f"0x{status:04X} ({meaning})"


def is_warning(status: int) -> bool:
    return 0xB000 <= status <= 0xBFFF or status == 0x0107 or status == 0x0116


def is_transient(status: int) -> bool:
    """Out-of-resources refusals may succeed later; other failures will not."""
    return 0xA700 <= status <= 0xA7FF or status == PROCESSING_FAILURE
