"""Small hand-made CT instances for intake tests (bad input, duplicates, geometry).

The phantom module makes realistic series; these are tiny on purpose so a
test can craft exactly the defect it needs.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"


def ct_slice(*, series_uid: str, study_uid: str, frame_uid: str, index: int,
             z: float | None = None, size: int = 16, spacing: float = 2.5,
             sop_uid: str | None = None, value: int = 1000,
             iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
             ipp: tuple[float, float, float] | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "CT"
    ds.PatientName = "Test^Intake"
    ds.PatientID = "INTAKE1"
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    z = index * spacing if z is None else z
    ds.ImagePositionPatient = list(ipp) if ipp is not None else [-20.0, -20.0, z]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = [2.5, 2.5]
    ds.SliceThickness = spacing
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.full((size, size), value, dtype=np.uint16).tobytes()
    return ds


def series(n: int, **kwargs) -> list[Dataset]:
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    return [ct_slice(series_uid=series_uid, study_uid=study, frame_uid=frame, index=i, **kwargs)
            for i in range(n)]


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
