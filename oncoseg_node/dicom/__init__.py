"""Shared DICOM parts used by several stages: named DIMSE statuses, file meta encoding."""
