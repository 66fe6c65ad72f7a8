from __future__ import annotations

import io

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from oncoseg_node.dicom.filemeta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    encode_file_meta,
)
from tests.ctfactory import series


def test_file_meta_matches_pydicoms_encoding_of_the_same_elements():
    meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1",
                            "CTSIM")
    reference = FileMetaDataset()
    reference.FileMetaInformationVersion = b"\x00\x01"
    reference.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.MediaStorageSOPInstanceUID = "1.2.3.4"
    reference.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    reference.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    reference.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    reference.SourceApplicationEntityTitle = "CTSIM"
    buffer = io.BytesIO()
    write_file_meta_info(buffer, reference, enforce_standard=True)
    assert meta == b"\x00" * 128 + b"DICM" + buffer.getvalue()


def test_file_with_our_meta_reads_back():
    ds = series(1)[0]
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)  # the dataset alone, as it travels in a C-STORE
    raw = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1") + \
        body.getvalue()
    back = pydicom.dcmread(io.BytesIO(raw))
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
