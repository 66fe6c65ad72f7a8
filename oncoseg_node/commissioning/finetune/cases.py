"""Training cases: a CT folder and its approved structure set, matched by TG-263 name.

A case folder holds ``ct/`` and ``reference.dcm`` (the layout ``evaluate
--cases`` reads). A case is skipped, with its reason, when its structure set
does not reference its CT series or holds none of the structures asked for.
Cases are split into training and validation by patient, never by slice, so
no patient's anatomy is seen on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from oncoseg_node.contouring.pipeline import load_ct_series
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.errors import OncosegError
from oncoseg_node.rtstruct.reader import rasterize_rtstruct

REFERENCE_NAME = "reference.dcm"


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One patient's CT and the reference masks of the structures asked for."""

    name: str
    patient_id: str
    volume: Volume
    masks: Mapping[str, np.ndarray]  # TG-263 name -> (z, y, x) boolean
    reference_sha256: str


@dataclass(frozen=True)
class SkippedCase:
    name: str
    reason: str


def referenced_series(rtstruct: pydicom.Dataset) -> set[str]:
    """Series Instance UIDs the structure set's Referenced Frame of Reference names."""
    uids = set()
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uids.add(str(series.SeriesInstanceUID))
    return uids


def load_case(folder: Path, structures: Sequence[str],
              aliases: Mapping[str, str]) -> TrainingCase | SkippedCase:
    """Read one case folder; a SkippedCase says why it cannot train."""
    reference = folder / REFERENCE_NAME
    ct_dir = folder / "ct"
    if not reference.is_file() or not ct_dir.is_dir():
        return SkippedCase(folder.name, f"needs ct/ and {REFERENCE_NAME}")
    try:
        rtstruct = pydicom.dcmread(reference)
        volume, _ = load_ct_series(sorted(p for p in ct_dir.iterdir() if p.is_file()))
    except (OSError, OncosegError, pydicom.errors.InvalidDicomError) as exc:
        return SkippedCase(folder.name, f"unreadable: {exc}")
    series = referenced_series(rtstruct)
    if volume.series_instance_uid not in series:
        named = ", ".join(sorted(series)) or "no series"
        return SkippedCase(folder.name, f"structure set references {named}, "
                                        f"not the CT series {volume.series_instance_uid}")
    masks: dict[str, np.ndarray] = {}
    for name, mask in rasterize_rtstruct(rtstruct, volume).items():
        tg263 = aliases.get(name, name)
        if tg263 in structures and mask.any():
            masks[tg263] = masks[tg263] | mask if tg263 in masks else mask
    if not masks:
        return SkippedCase(folder.name, "no structure matches "
                                        f"{', '.join(structures)} (after the alias map)")
    digest = hashlib.sha256(reference.read_bytes()).hexdigest()
    patient = str(volume.header.get("PatientID", "") or "") or folder.name
    return TrainingCase(folder.name, patient, volume, masks, digest)


def load_cases(root: Path, structures: Sequence[str], aliases: Mapping[str, str]
               ) -> tuple[list[TrainingCase], list[SkippedCase]]:
    folders = sorted(d for d in Path(root).iterdir() if d.is_dir()) if Path(root).is_dir() \
        else []
    if not folders:
        raise OncosegError(f"{root}: no case folders")
    cases: list[TrainingCase] = []
    skipped: list[SkippedCase] = []
    for folder in folders:
        loaded = load_case(folder, structures, aliases)
        (cases if isinstance(loaded, TrainingCase) else skipped).append(loaded)  # type: ignore[arg-type]
    return cases, skipped


def split_by_patient(cases: Sequence[TrainingCase], validation_fraction: float, seed: int
                     ) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Deterministic split of patients (hash order); every case of a patient on one side."""
    patients = sorted({c.patient_id for c in cases},
                      key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_val = int(round(len(patients) * validation_fraction))
    if validation_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    held_out = set(patients[:n_val])
    train = [c for c in cases if c.patient_id not in held_out]
    validation = [c for c in cases if c.patient_id in held_out]
    return train, validation


def case_list_sha256(cases: Sequence[TrainingCase]) -> str:
    """Identity of the training material: case names, patients and reference files."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.name):
        digest.update(f"{case.name}\0{case.patient_id}\0{case.reference_sha256}\n".encode())
    return digest.hexdigest()
