"""Compressed CT as PACS and routers hold it: negotiated, stored as received, decoded later.

Files are compressed by DCMTK (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) or, for
JPEG 2000 which DCMTK does not encode, by pydicom with pylibjpeg-openjpeg,
and sent by DCMTK storescu in their own transfer syntax.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.contouring.volume import decode_pixels
from oncoseg_node.errors import PixelDecodeError
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests.ctfactory import encode, series
from tests.peers import DCMTK_ENV, require

pytestmark = pytest.mark.peers

# transfer syntax -> DCMTK command making it from an uncompressed file (None: pydicom)
MAKERS: dict[str, list[str] | None] = {
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLSNearLossless: ["dcmcjpls", "+en", "+md", "2"],
    RLELossless: ["dcmcrle"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
    JPEG2000Lossless: None,
    JPEG2000: None,
}
LOSSY_MAX_ERROR = {JPEGLSNearLossless: 2, JPEG2000: 64}
# storescu's option proposing each syntax in a context of its own (-R: only
# the contexts the files need); it has none for JPEG process 14, which
# pynetdicom sends instead.
STORESCU_PROPOSE = {
    JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", JPEGLSNearLossless: "-xu",
    RLELossless: "-xr", DeflatedExplicitVRLittleEndian: "-xd", JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
}


def send_as_is(path: Path, port: int, syntax: str) -> None:
    if syntax in STORESCU_PROPOSE:
        proc = subprocess.run(
            [require("storescu"), "-R", STORESCU_PROPOSE[syntax], "-aet", "CTSIM",
             "-aec", "ONCOSEG", "127.0.0.1", str(port), str(path)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "E:" not in proc.stderr, proc.stderr
        return
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG")
    try:
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
    finally:
        assoc.release()


def ct_file(path: Path, seed: int = 0) -> np.ndarray:
    """A 64 x 64 CT slice with 12-bit noise (so codecs have work); returns its pixels."""
    ds = series(1, size=64)[0]
    pixels = np.random.default_rng(seed).integers(0, 4096, (64, 64), dtype=np.uint16)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = pixels.tobytes()
    path.write_bytes(encode(ds))
    return pixels


def compress(source: Path, target: Path, syntax: str) -> None:
    maker = MAKERS[syntax]
    if maker is None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False,
                    **({"j2k_psnr": [80]} if syntax == JPEG2000 else {}))
        ds.save_as(target, enforce_file_format=True)
    else:
        subprocess.run([require(maker[0]), *maker[1:], str(source), str(target)],
                       env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
    assert str(pydicom.dcmread(target).file_meta.TransferSyntaxUID) == syntax


@pytest.fixture
def node(make_config):
    cfg = make_config()
    ledger, spool = Ledger(cfg.ledger_path), Spool(cfg.spool_dir)
    receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
    receiver.start()
    yield receiver, ledger, spool
    receiver.stop_accepting()


@pytest.mark.parametrize("syntax", sorted(MAKERS))
def test_compressed_ct_is_stored_as_received_and_decodes_to_the_original(node, tmp_path, syntax):
    receiver, ledger, spool = node
    original = ct_file(tmp_path / "plain.dcm")
    sent = tmp_path / "sent.dcm"
    compress(tmp_path / "plain.dcm", sent, syntax)
    send_as_is(sent, receiver.port, syntax)
    (relpath,) = spool.all_relpaths()
    stored = pydicom.dcmread(spool.path(relpath))
    assert str(stored.file_meta.TransferSyntaxUID) == syntax
    if syntax != DeflatedExplicitVRLittleEndian:  # inflated on reading, so not comparable
        assert stored.PixelData == pydicom.dcmread(sent).PixelData
    decoded = decode_pixels(stored)
    error = np.abs(decoded - original.astype(np.float32)).max()
    assert error <= LOSSY_MAX_ERROR.get(syntax, 0)


def test_uncompressed_is_preferred_when_a_sender_offers_both(node):
    receiver, *_ = node
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless, JPEGLosslessSV1,
                                              ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
    try:
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


def test_compressed_only_offer_is_accepted(node):
    receiver, *_ = node
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
    try:
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax == [JPEG2000Lossless]
    finally:
        assoc.release()


def test_a_frame_that_fails_to_decode_names_instance_and_syntax(tmp_path):
    ct_file(tmp_path / "plain.dcm")
    compress(tmp_path / "plain.dcm", tmp_path / "j2k.dcm", JPEG2000Lossless)
    ds = pydicom.dcmread(tmp_path / "j2k.dcm")
    fragment_start = ds.PixelData.index(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ markers
    ds.PixelData = ds.PixelData[:fragment_start + 40] + bytes(len(ds.PixelData)
                                                               - fragment_start - 40)
    with pytest.raises(PixelDecodeError, match="JPEG 2000") as caught:
        decode_pixels(ds)
    assert str(ds.SOPInstanceUID) in str(caught.value)


def test_deflate_bomb_is_refused_without_inflating_it(node, tmp_path):
    """80 MiB of zeros deflate to ~80 KiB; the node inflates at most 64 MiB for its checks."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian as deflated
    from pynetdicom import _config

    from oncoseg_node.dicom import status

    receiver, ledger, spool = node
    ds = series(1)[0]
    ds.add_new(0x00091010, "LO", "BOMB")  # private block for the padding element
    ds.add_new(0x00091011, "OB", bytes(80 * 1024 * 1024))
    ds.file_meta.TransferSyntaxUID = deflated
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1024 * 1024
    del ds
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="CTSIM")
        ae.add_requested_context(CTImageStorage, [deflated])
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
        try:
            answer = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert int(answer.Status) == status.CANNOT_UNDERSTAND
    assert "inflates beyond 64 MiB" in str(answer.ErrorComment)
    assert spool.all_relpaths() == set() and ledger.open_series() == []
