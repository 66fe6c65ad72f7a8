"""Named DIMSE status codes the node answers and reads, and what they mean.

A status is always one of these names in code, never a bare hex literal.
Categories (success, warning, failure) and meanings come from pynetdicom's
tables of PS3.4 Annex B and PS3.7 Annex C; this module only gives the codes
pynetdicom leaves unnamed a name, and says which failures are worth a retry.
"""

from __future__ import annotations

from pynetdicom.status import (
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
    code_to_category,
)

SUCCESS = int(Status.SUCCESS)
# Storage Service Class failures (PS3.4 B.2.3); each names the first code of its range
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Refusals of one received instance, each its own code inside those ranges
# (the low byte is the SCP's detail) so a sender's log tells them apart.
MODALITY_DOES_NOT_MATCH_SOP_CLASS = 0xA901
IMAGE_PIXEL_MODULE_INVALID = 0xA902
PIXEL_DATA_MISSING = 0xA903
PIXEL_DATA_LENGTH_WRONG = 0xA904
RESCALE_INVALID = 0xA905  # RescaleSlope / RescaleIntercept that give no HU
UID_NOT_CONFORMANT = 0xC001
ELEMENT_VR_UNKNOWN = 0xC002
# General failure (PS3.7 C); also the answer to an unexpected error in a handler
PROCESSING_FAILURE = 0x0110
# Storage warning
COERCION_OF_DATA_ELEMENTS = 0xB000
# The low byte of a ranged Storage status is the sender's own detail.
_RANGE_DETAIL = 0x00FF


def describe(status: int) -> str:
    """Human-readable meaning of a status, with its code in hex."""
    if status == SUCCESS:
        meaning = "Success"
    elif status in STORAGE_SERVICE_CLASS_STATUS:
        meaning = STORAGE_SERVICE_CLASS_STATUS[status][1]
    else:
        meaning = code_to_category(status)
    return f"0x{status:04X} ({meaning})"


def is_warning(status: int) -> bool:
    """A Warning status: the standard counts the instance as stored."""
    return code_to_category(status) == STATUS_WARNING


def is_transient(status: int) -> bool:
    """Out-of-resources refusals may succeed later; other failures will not."""
    return (OUT_OF_RESOURCES <= status <= OUT_OF_RESOURCES | _RANGE_DETAIL
            or status == PROCESSING_FAILURE)
