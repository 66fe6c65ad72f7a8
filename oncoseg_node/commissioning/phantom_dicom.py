"""The phantom's slices as CT Image Storage datasets a scanner would send."""

from __future__ import annotations

import datetime as _dt

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from oncoseg_node import __version__
from oncoseg_node.dicom.filemeta import IMPLEMENTATION_CLASS_UID

BODY_PART = {"thorax": "CHEST", "head": "HEAD", "pelvis": "PELVIS", "abdomen": "ABDOMEN"}


def _ds(value: float) -> str:
    """A DS value within 16 characters, without float noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


_WHEN = _dt.datetime(2026, 1, 15, 9, 30, 0)


def slice_dataset(pixels: np.ndarray, index: int, ipp: np.ndarray, row_dir: np.ndarray,
                   col_dir: np.ndarray, spacing: tuple[float, float], thickness: float,
                   position: str, site: str, description: str, tilt: float,
                   patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    date, time = _WHEN.strftime("%Y%m%d"), _WHEN.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = "PH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "oncoseg-node phantom"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT simulation (synthetic phantom)"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "phantom"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = BODY_PART[site]
    ds.SliceThickness = _ds(thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = __version__
    ds.ReconstructionDiameter = _ds(pixels.shape[1] * spacing[1])
    ds.GantryDetectorTilt = _ds(tilt)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 300
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = position
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(ipp @ np.cross(row_dir, col_dir)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds
