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
from oncoseg_node.rtstruct.profiles import DestinationProfile
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct


def write_structure_set(contoured: Contoured, protocols: ProtocolSet, engines: EngineSet,
                        profile: DestinationProfile, path: Path, *,
                        sop_instance_uid: str | None = None) -> Dataset:
    """Build, write, read back and verify the RT Structure Set for one profile."""
    by_name = {s.name: s for s in contoured.protocol.structures}
    rois = [
        RoiMask(name=r.name, color=by_name[r.name].color,
                interpreted_type=by_name[r.name].interpreted_type, mask=r.found_mask,
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
    ds = build_rtstruct(contoured.volume, rois, info, profile, sop_instance_uid=sop_instance_uid)
    save_verified(ds, path, contoured.volume, profile)
    return pydicom.dcmread(path)
