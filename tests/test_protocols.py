from __future__ import annotations

from pathlib import Path

import pytest

from oncoseg_node.errors import ConfigError
from oncoseg_node.phantom import make_phantom
from oncoseg_node.protocols import load_protocols

REPO = Path(__file__).resolve().parents[1]


def test_shipped_library_and_site_protocols():
    protocols = load_protocols(REPO / "config" / "protocols.yaml")
    assert len(protocols.library) >= 30
    assert {p.name for p in protocols.protocols} >= {"head-and-neck", "thorax", "abdomen",
                                                     "pelvis"}
    assert protocols.library["Parotid_L"].laterality == "left"
    assert protocols.library["Lung_L"].hu_window == (-950.0, -500.0)
    assert len(protocols.version) == 12


@pytest.mark.parametrize(("site", "protocol"),
                         [("thorax", "thorax"), ("head", "head-and-neck"), ("pelvis", "pelvis")])
def test_phantom_sites_match_their_protocol(site, protocol):
    phantom = make_phantom(slices=2, rows=32, columns=32, pixel_spacing=(10.0, 10.0), site=site)
    assert load_protocols(REPO / "config" / "protocols.yaml").match(
        phantom.volume.header).name == protocol


def test_every_problem_is_listed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"
        "  Heart: {color: [300, 0, 0], engine: magic, laterality: up, colour: red}\n"
        "  Liver: {color: [1, 2, 3], volume_cc: [10]}\n"
        "protocols:\n"
        "  - name: a\n"
        "    match: {attributes: {SeriesDescription: '(unclosed'}, slice_thickness_mm: [5, 1]}\n"
        "    structures: [Liver, Kidney]\n"
        "  - name: a\n"
        "    structures: [Liver]\n"
        "fallback: nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_protocols(path)
    text = "\n".join(info.value.problems)
    for expected in ("structures.Heart.color", "structures.Liver.volume_cc",
                     "protocols.a.match.attributes.SeriesDescription",
                     "slice_thickness_mm", "unknown structure 'Kidney'",
                     "protocols.a: name used twice", "fallback: 'nowhere'"):
        assert expected in text, expected
