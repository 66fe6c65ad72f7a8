from __future__ import annotations

import pytest

from oncoseg_node.intake.spool import TMP_SUFFIX, Spool


def test_store_writes_bytes_under_generated_name(tmp_path):
    spool = Spool(tmp_path)
    stored = spool.store(b"DICM-bytes")
    path = spool.path(stored.relpath)
    assert path.read_bytes() == b"DICM-bytes"
    assert stored.size == 10
    assert path.parent.parent == spool.objects
    assert not list(spool.objects.rglob(f"*{TMP_SUFFIX}"))


def test_path_refuses_escape(tmp_path):
    spool = Spool(tmp_path / "spool")
    for hostile in ("../x", "objects/../../x", "/etc/passwd"):
        with pytest.raises(ValueError):
            spool.path(hostile)


def test_partials_from_a_crash_are_cleaned(tmp_path):
    spool = Spool(tmp_path)
    stored = spool.store(b"kept")
    leftover = spool.objects / "ab" / f".deadbeef.dcm.1234{TMP_SUFFIX}"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half")
    assert spool.clean_partials() == 1
    assert not leftover.exists()
    assert spool.all_relpaths() == {stored.relpath}
