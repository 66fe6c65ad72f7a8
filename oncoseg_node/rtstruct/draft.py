"""The draft structure set of one contoured series, for one destination's profile.

Each found structure becomes an ROI in its protocol colour and type; the
generation info names the engines, their models and the protocol version.
The file is built, written, read back and verified before anything sends it.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from oncoseg_node.contouring.engines.registry import EngineSet
from oncoseg_node.contouring.pipeline import Contoured
from oncoseg_node.contouring.protocols import ProtocolSet
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct.profiles import DestinationProfile
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import (
    STRUCTURE_SET_LABEL,
    GenerationInfo,
    RoiMask,
    build_rtstruct,
)

# StructureSetDescription is ST (1024 characters) and also carries the warning,
# the other notes and the generation details: the flags get at most this much.
FLAGS_NOTE_LIMIT = 480


def structure_set_label(job_id: int, version: int) -> str:
    """StructureSetLabel of a job's version: unique per job and version, within SH's 16 characters.

    A planning system lists structure sets by label; "AUTO DRAFT" for every
    patient and version let a new version be mistaken for the old one.
    """
    for label in (f"AUTO J{job_id} V{version}", f"J{job_id}V{version}"):
        if len(label) <= 16:
            return label
    raise RTStructError(f"job {job_id} version {version} has no StructureSetLabel within "
                        "16 characters")


def flags_note(contoured: Contoured) -> str | None:
    """The sanity flags in one sentence, or, when they would crowd out the rest of the
    1024-character description, how many there are and on which structures."""
    flagged = [(r.name, r.flags) for r in contoured.results if r.flags]
    if not flagged:
        return None
    count = sum(len(flags) for _, flags in flagged)
    full = "; ".join(f"{name}: {flag}" for name, flags in flagged for flag in flags)
    note = f"Sanity flags ({count}): {full}."
    if len(note) <= FLAGS_NOTE_LIMIT:
        return note
    return (f"Sanity flags ({count}) on {', '.join(name for name, _ in flagged)}: "
            "see the job page.")


def description_notes(contoured: Contoured) -> list[str]:
    """What the reviewer must know before trusting the set: structures not found, sanity
    flags, overrides."""
    notes = []
    absent = [r.name for r in contoured.results if r.absent]
    if absent:
        notes.append(f"Not found (not in this set): {', '.join(absent)}.")
    flags = flags_note(contoured)
    if flags:
        notes.append(flags)
    finding = contoured.geometry.overridden
    if finding:
        # A series held as incomplete is not a geometry finding; say which it was.
        kind = "" if finding.startswith("incomplete: ") else "the geometry finding: "
        notes.append(f"Released by an operator despite {kind}{finding}.")
    return notes


def write_structure_set(contoured: Contoured, protocols: ProtocolSet, engines: EngineSet,
                        profile: DestinationProfile, path: Path, *,
                        sop_instance_uid: str | None = None, label: str | None = None,
                        predecessor_uid: str | None = None) -> Dataset:
    """Build, write, read back and verify the RT Structure Set for one profile.

    ``label`` (see :func:`structure_set_label`) and ``predecessor_uid`` (the
    previous version's structure set for the same profile) come from the job.
    """
    by_name = {s.name: s for s in contoured.protocol.structures}
    rois = [
        RoiMask(name=r.name, color=by_name[r.name].color,
                interpreted_type=by_name[r.name].interpreted_type, mask=r.found_crop,
                engine=by_name[r.name].engine)
        for r in contoured.results if not r.absent
    ]
    used = sorted({by_name[r.name].engine for r in contoured.results})
    info = GenerationInfo(
        engine=",".join(used),
        model=engines.describe_for(contoured.protocol.structures),
        protocol_name=contoured.protocol.name,
        protocol_version=protocols.version,
        models={name: engines.engines[name].description for name in used
                if name in engines.engines},
        short_models={name: str(getattr(engines.engines[name], "short_id", ""))
                      for name in used if name in engines.engines},
    )
    ds = build_rtstruct(contoured.volume, rois, info, profile, sop_instance_uid=sop_instance_uid,
                        label=label or STRUCTURE_SET_LABEL, notes=description_notes(contoured),
                        predecessor_uid=predecessor_uid)
    save_verified(ds, path, contoured.volume, profile)
    return pydicom.dcmread(path)
