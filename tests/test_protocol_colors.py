"""The shipped protocols' colours can be told apart on a planning-system screen."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncoseg_node.contouring.colors import BONE_DISPLAY, close_pairs, delta_e
from oncoseg_node.contouring.protocols import load_protocols

PROTOCOLS = load_protocols(Path(__file__).resolve().parents[1] / "config" / "protocols.yaml")


def test_colour_difference_is_cie76():
    assert delta_e((255, 255, 255), (0, 0, 0)) == pytest.approx(100.0, abs=0.1)
    assert delta_e((255, 0, 0), (255, 0, 0)) == 0.0
    # the old lung colours: three similar blues
    assert close_pairs([("Lung_L", (0, 154, 205)), ("Lung_R", (0, 191, 255)),
                        ("Lungs", (135, 206, 250))]) == [
        ("Lung_L", "Lung_R", 15.0), ("Lung_L", "Lungs", 22.0), ("Lung_R", "Lungs", 17.2)]


@pytest.mark.parametrize("protocol", PROTOCOLS.protocols, ids=lambda p: p.name)
def test_no_two_structures_of_a_protocol_look_alike(protocol):
    assert close_pairs([(s.name, s.color) for s in protocol.structures]) == []


def test_left_and_right_lungs_are_clearly_different():
    lib = PROTOCOLS.library
    assert delta_e(lib["Lung_L"].color, lib["Lung_R"].color) >= 40


def test_bones_stand_out_on_bone():
    assert delta_e(PROTOCOLS.library["Bones"].color, BONE_DISPLAY) >= 50


def test_check_config_warns_of_colours_that_look_alike(tmp_path):
    import subprocess
    import sys

    from tests.conftest import write_config

    text = (Path(__file__).resolve().parents[1] / "config" / "protocols.yaml").read_text()
    # a physicist's edit: the right lung back to the old blue, next to the left one
    text = text.replace("Lung_R:        {color: [255, 128, 255]", "Lung_R:        {color: "
                        "[0, 120, 250]")
    protocols = tmp_path / "protocols.yaml"
    protocols.write_text(text)
    config = write_config(tmp_path, protocols=str(protocols))
    proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("warning: protocols.thorax: Lung_L and Lung_R look alike on screen (colour "
            "difference") in proc.stdout
    (tmp_path / "shipped").mkdir()
    shipped = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "check-config",
                              "--config", str(write_config(tmp_path / "shipped"))],
                             capture_output=True, text=True, timeout=120)
    assert shipped.returncode == 0 and "look alike" not in shipped.stdout
