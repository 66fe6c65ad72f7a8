"""C-STORE data sets are written into the spool as their fragments arrive.

The sender here is a raw socket, so fragments can be cut and combined as no
library would: the command and its whole data set in one PDU, a data set in
thousands of small fragments, a connection closed in the middle of one. A
real storescu sends an instance larger than the part kept in memory.
"""

from __future__ import annotations

import hashlib
import os
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from oncoseg_node.dicom import status
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import HEAD_BYTES, TMP_SUFFIX, Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests import rawpdu
from tests.ctfactory import encode, series
from tests.peers import storescu

pytestmark = pytest.mark.peers

COMMAND_LAST = 0x03
DATA_MORE = 0x00
DATA_LAST = 0x02
MAX_PDU = 16384  # what rawpdu.associate_rq offers; the node's limit is larger


@pytest.fixture
def node(make_config):
    cfg = make_config()
    ledger = Ledger(cfg.ledger_path)
    spool = Spool(cfg.spool_dir)
    receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
    receiver.start()
    yield receiver, ledger, spool
    receiver.stop_accepting()


def data_set_bytes(ds) -> bytes:
    """The data set as it travels in a C-STORE (Explicit VR Little Endian, no file meta)."""
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, ds)
    return stream.getvalue()


def command_bytes(ds, message_id: int = 1) -> bytes:
    """The C-STORE-RQ command set for ``ds``, encoded as pynetdicom sends it."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    first = next(iter(message.encode_msg(1, 1 << 20)))
    _cid, value = first.presentation_data_value_list[0]
    assert value[0] == COMMAND_LAST
    return bytes(value[1:])


def associated(port: int):
    sock = rawpdu.connect(port)
    sock.sendall(rawpdu.associate_rq())
    assert rawpdu.read_pdu(sock)[0] == 0x02
    return sock


def response_status(sock) -> int:
    pdu_type, body = rawpdu.read_pdu(sock)
    assert pdu_type == 0x04, pdu_type
    # one PDV: length (4), context (1), control (1), then the command set
    command = body[6:]
    at = command.find(b"\x00\x00\x00\x09")  # (0000,0900) Status, implicit VR
    assert at >= 0
    return int.from_bytes(command[at + 8:at + 10], "little")


def release(sock) -> None:
    sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert rawpdu.read_pdu(sock)[0] == 0x06
    sock.close()


def stored_data_set(spool: Spool, ledger: Ledger, ds) -> bytes:
    row = ledger.find_instance(str(ds.SOPInstanceUID))
    assert row is not None
    stored = spool.path(row.relpath).read_bytes()
    meta_end = 144 + int.from_bytes(stored[140:144], "little")
    assert hashlib.sha256(stored[meta_end:]).hexdigest() == row.sha256
    assert dcmread(spool.path(row.relpath)).file_meta.SourceApplicationEntityTitle == "CTSIM"
    return stored[meta_end:]


def spool_leftovers(spool: Spool) -> list[Path]:
    return list(spool.objects.rglob(f"*{TMP_SUFFIX}"))


def open_instance_files() -> list[str]:
    """Files this process holds open that hold received data sets (spool or temporary)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith((TMP_SUFFIX, ".dcm")) or TMP_SUFFIX + " (deleted)" in target:
            names.append(target)
    return names


def test_command_and_whole_data_set_in_one_pdu(node):
    receiver, ledger, spool = node
    ds = series(1, size=32)[0]
    data = data_set_bytes(ds)
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(ds)), (1, DATA_LAST, data)))
    assert response_status(sock) == status.SUCCESS
    release(sock)
    assert stored_data_set(spool, ledger, ds) == data
    assert spool_leftovers(spool) == []


def test_data_set_in_many_small_fragments_is_stored_as_sent(node):
    receiver, ledger, spool = node
    datasets = series(2, size=128)
    sock = associated(receiver.port)
    for message_id, ds in enumerate(datasets, start=1):
        data = data_set_bytes(ds)
        sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(ds, message_id))))
        step = 1000  # odd sizes: fragments do not line up with elements
        for at in range(0, len(data), step):
            last = at + step >= len(data)
            sock.sendall(rawpdu.p_data((1, DATA_LAST if last else DATA_MORE,
                                        data[at:at + step])))
        assert response_status(sock) == status.SUCCESS
    release(sock)
    for ds in datasets:
        assert stored_data_set(spool, ledger, ds) == data_set_bytes(ds)


def test_data_set_cut_off_leaves_no_file_and_no_descriptor(node):
    receiver, ledger, spool = node
    ds = series(1, size=256)[0]
    data = data_set_bytes(ds)
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(ds))))
    sock.sendall(rawpdu.p_data((1, DATA_MORE, data[:MAX_PDU - 100])))
    deadline = time.monotonic() + 10
    while not spool_leftovers(spool) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool_leftovers(spool), "the data set is written to the spool as it arrives"
    sock.close()  # mid data set: the sender never saw a response
    deadline = time.monotonic() + 10
    while (spool_leftovers(spool) or open_instance_files()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_leftovers(spool) == []
    assert open_instance_files() == []
    assert ledger.find_instance(str(ds.SOPInstanceUID)) is None


def test_refused_instance_leaves_no_file(node):
    receiver, ledger, spool = node
    ds = series(1, size=64)[0]
    data = data_set_bytes(ds)[:-100]  # PixelData shorter than its rows and columns
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(ds)), (1, DATA_LAST, data)))
    assert response_status(sock) == status.PIXEL_DATA_LENGTH_WRONG
    release(sock)
    assert ledger.find_instance(str(ds.SOPInstanceUID)) is None
    assert spool_leftovers(spool) == [] and spool.all_relpaths() == set()
    assert open_instance_files() == []


def test_instance_larger_than_the_part_kept_in_memory(node, tmp_path):
    receiver, ledger, spool = node
    datasets = series(2, size=1024)  # 2 MiB of pixels each
    assert len(data_set_bytes(datasets[0])) > HEAD_BYTES
    files = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"big{i}.dcm"
        path.write_bytes(encode(ds))
        files.append(path)
    assert storescu(files, receiver.port).returncode == 0
    for ds in datasets:
        assert stored_data_set(spool, ledger, ds) == data_set_bytes(ds)
    assert spool_leftovers(spool) == []
