from __future__ import annotations

from pathlib import Path

import pytest

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.protocols import load_protocols
from oncoseg_node.errors import ConfigError
from oncoseg_node.ledger import JobState

REPO = Path(__file__).resolve().parents[1]


def test_shipped_library_and_site_protocols():
    protocols = load_protocols(REPO / "config" / "protocols.yaml")
    assert len(protocols.library) >= 30
    assert {p.name for p in protocols.protocols} >= {"head-and-neck", "thorax", "abdomen",
                                                     "pelvis"}
    assert protocols.library["Parotid_L"].laterality == "left"
    assert protocols.library["Lung_L"].hu_window == (-950.0, -500.0)
    assert len(protocols.version) == 12
    assert protocols.library["Bowel"].parts == "many"
    assert protocols.library["Liver"].parts == "one"


def test_shipped_sided_sam3_organs_carry_a_side_neutral_concept():
    """SAM3 reads "left" as image-left; the side comes from patient coordinates instead."""
    library = load_protocols(REPO / "config" / "protocols.yaml").library
    sided = [s for s in library.values() if s.engine == "sam3" and s.laterality]
    assert len(sided) >= 16
    for structure in sided:
        assert any(not {"left", "right"} & set(c.split()) for c in structure.concepts), \
            structure.name
        assert any(structure.laterality in c.split() for c in structure.concepts), structure.name


def test_parts_and_model_window_are_read_and_checked(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"                                                               # 1
        "  Bowel: {color: [1, 2, 3], engine: sam3, concepts: [bowel], parts: many,\n"  # 2
        "          model_window: [-160, 240], hu_window: [-100, 200]}\n"               # 3
        "  Liver: {color: [1, 2, 3], engine: sam3, concepts: [liver]}\n"               # 4
        "protocols:\n"                                                                 # 5
        "  - name: a\n"                                                                # 6
        "    structures: [Bowel, Liver]\n")                                            # 7
    library = load_protocols(path).library
    assert (library["Bowel"].parts, library["Bowel"].model_window) == ("many", (-160.0, 240.0))
    assert library["Bowel"].hu_window == (-100.0, 200.0)
    assert (library["Liver"].parts, library["Liver"].model_window) == ("one", None)
    path.write_text(path.read_text().replace("parts: many", "parts: several")
                    .replace("[-160, 240]", "[240, -160]"))
    assert_refused_with(path, [
        (2, "structures.Bowel.parts: 'several' is not one or many"),
        (3, "structures.Bowel.model_window: [240, -160] is not [low, high]"),
    ])


@pytest.mark.parametrize(("site", "protocol"),
                         [("thorax", "thorax"), ("head", "head-and-neck"), ("pelvis", "pelvis")])
def test_phantom_sites_match_their_protocol(site, protocol):
    phantom = make_phantom(slices=2, rows=32, columns=32, pixel_spacing=(10.0, 10.0), site=site)
    assert load_protocols(REPO / "config" / "protocols.yaml").match(
        phantom.volume.header).name == protocol


def assert_refused_with(path, expected: list[tuple[int, str]]) -> list[str]:
    """Loading ``path`` fails listing each (line, message) as FILE:LINE: message."""
    with pytest.raises(ConfigError) as info:
        load_protocols(path)
    problems = info.value.problems
    for line, message in expected:
        assert any(p.startswith(f"{path}:{line}: {message}") for p in problems), \
            (line, message, problems)
    return problems


def test_every_problem_is_listed_with_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"                                                          # 1
        "  Heart: {color: [300, 0, 0], engine: magic}\n"                         # 2
        "  Liver: {color: [1, 2, 3], volume_cc: [10]}\n"                         # 3
        "  Left Parotid: {color: [1, 2, 3]}\n"                                   # 4
        "protocols:\n"                                                           # 5
        "  - name: a\n"                                                          # 6
        "    match:\n"                                                           # 7
        "      attributes: {SeriesDescription: '(unclosed'}\n"                   # 8
        "      slice_thickness_mm: [5, 1]\n"                                     # 9
        "    structures: [Liver, Kidney, Liver]\n"                               # 10
        "  - name: a\n"                                                          # 11
        "    structures: [Liver]\n"                                              # 12
        "fallback: nowhere\n"                                                    # 13
        "colour: red\n")                                                         # 14
    assert_refused_with(path, [
        (2, "structures.Heart.color: [300, 0, 0] is not [R, G, B]"),
        (3, "structures.Liver.volume_cc: [10] is not [low, high]"),
        (4, "structures.Left Parotid: 'Left Parotid' breaks TG-263 naming"),
        (8, "protocols.a.match.attributes.SeriesDescription: missing )"),
        (9, "protocols.a.match.slice_thickness_mm: [5, 1] is not [min, max]"),
        (10, "protocols.a.structures: 'Liver' listed twice"),
        (10, "protocols.a.structures: unknown structure 'Kidney'"),
        (13, "fallback: 'nowhere' is not a protocol"),
        (14, "colour: unknown key"),
    ])


def test_bad_postprocess_settings_are_named_with_their_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"                                                          # 1
        "  Heart:\n"                                                             # 2
        "    color: [1, 2, 3]\n"                                                 # 3
        "    postprocess:\n"                                                     # 4
        "      smoothing_mm: fast\n"                                             # 5
        "      keep_components: 0\n"                                             # 6
        "      min_slice_island_mm2: 5\n"                                        # 7
        "      blur: 1\n"                                                        # 8
        "protocols:\n"
        "  - name: a\n"
        "    structures: [Heart]\n")
    problems = assert_refused_with(path, [
        (5, "structures.Heart.postprocess.smoothing_mm: 'fast' is not a number >= 0"),
        (6, "structures.Heart.postprocess.keep_components: 0 is not a whole number"),
        (8, "structures.Heart.postprocess.blur: unknown key"),
    ])
    assert len(problems) == 3


def test_shadowed_protocol_and_destination_name_limit(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"
        "  External: {color: [0, 255, 0], type: EXTERNAL}\n"
        "  Glnd_Submand_L: {color: [1, 2, 3]}\n"
        "protocols:\n"
        "  - name: catch-all\n"
        "    priority: 10\n"
        "    structures: [External]\n"
        "  - name: thorax\n"
        "    priority: 5\n"
        "    match: {attributes: {SeriesDescription: thorax}}\n"
        "    structures: [Glnd_Submand_L]\n")
    with pytest.raises(ConfigError) as info:
        load_protocols(path, max_roi_name_length=12)
    text = "\n".join(info.value.problems)
    assert f"{path}:8: protocols.thorax: can never match, protocol 'catch-all'" in text
    assert f"{path}:3: structures.Glnd_Submand_L: longer than 12 characters" in text


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_protocols_list_and_explain_cli(tmp_path):
    from oncoseg_node.commissioning.phantom import write_phantom

    config = str(REPO / "config" / "oncoseg-node.yaml")
    listed = run_cli("protocols", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert "head-and-neck (priority 30)" in listed.stdout
    assert "Parotid_L" in listed.stdout and "left parotid gland" in listed.stdout
    write_phantom(tmp_path, slices=2, rows=32, columns=32, pixel_spacing=(10.0, 10.0),
                  site="pelvis")
    explained = run_cli("protocols", "explain", str(tmp_path), "--config", config)
    assert explained.returncode == 0, explained.stderr
    assert "pelvis (priority 20) matches" in explained.stdout
    assert "thorax (priority 22) does not match: SeriesDescription" in explained.stdout
    assert explained.stdout.strip().splitlines()[-1].startswith("=> pelvis: External")


def test_hot_reload_swaps_valid_edits_and_keeps_the_last_good_set(tmp_path):
    import time

    from oncoseg_node.contouring.protocol_watch import ProtocolWatcher

    path = tmp_path / "protocols.yaml"
    good = ("structures:\n  External: {color: [0, 255, 0], type: EXTERNAL}\n"
            "  Bones: {color: [255, 255, 0]}\n"
            "protocols:\n  - name: default\n    structures: [External]\nfallback: default\n")
    path.write_text(good)
    watcher = ProtocolWatcher(path)
    watcher.start()
    try:
        first = watcher.current()
        path.write_text(good.replace("structures: [External]", "structures: [External, Bones]"))
        deadline = time.monotonic() + 10
        while watcher.current().version == first.version and time.monotonic() < deadline:
            time.sleep(0.05)
        second = watcher.current()
        assert [s.name for s in second.by_name("default").structures] == ["External", "Bones"]
        path.write_text(good.replace("[0, 255, 0]", "[0, 999, 0]"))  # invalid colour
        time.sleep(1.0)
        assert watcher.reload() is False
        assert watcher.current() is second
    finally:
        watcher.stop()


@pytest.mark.peers
def test_hot_reload_on_a_running_daemon_changes_the_next_job(tmp_path):
    import time

    from oncoseg_node.commissioning.phantom import write_phantom
    from tests.conftest import write_config
    from tests.daemon import Daemon, wait_until
    from tests.peers import storescu

    protocols = tmp_path / "protocols.yaml"
    good = ("structures:\n  External: {color: [0, 255, 0], type: EXTERNAL}\n"
            "  Bones: {color: [255, 255, 0]}\n"
            "protocols:\n  - name: default\n    structures: [External]\nfallback: default\n")
    protocols.write_text(good)
    daemon = Daemon(write_config(tmp_path, protocols=str(protocols)), 0,
                    tmp_path / "daemon.log").start()

    def contour_new_series(seed: int) -> list[str]:
        folder = tmp_path / f"ct{seed}"
        phantom = write_phantom(folder, slices=4, rows=64, columns=64,
                                pixel_spacing=(8.0, 8.0), seed=seed,
                                patient_id=f"HOT{seed}")
        assert storescu(folder, daemon.port).returncode == 0
        uid = phantom.volume.series_instance_uid
        waiting = (JobState.QUEUED, JobState.RUNNING)
        (job,) = wait_until(lambda: [j for j in daemon.status() if j["series_uid"] == uid
                                     and j["state"] not in waiting], 60, "job")
        return [s["name"] for s in job["structures"]]

    try:
        assert contour_new_series(1) == ["External"]
        protocols.write_text(good.replace("[External]", "[External, Bones]"))
        wait_until(lambda: "protocols_reloaded" in daemon.log(), 10, "reload")
        assert contour_new_series(2) == ["External", "Bones"]
        protocols.write_text(good.replace("[0, 255, 0]", "[0, 999, 0]"))
        wait_until(lambda: "protocols_reload_rejected" in daemon.log(), 10, "rejection")
        time.sleep(0.5)
        assert contour_new_series(3) == ["External", "Bones"]
    finally:
        daemon.stop()


SHIPPED = REPO / "config" / "protocols.yaml"


@pytest.mark.parametrize(("description", "body_part", "protocol"), [
    ("Thorax 3mm Schnitt", "CHEST", "thorax"),
    ("Thorax 3mm Schnitt", "", "thorax"),
    ("HN Parotis 2mm", "HEAD", "head-and-neck"),
    ("Becken nativ", "PELVIS", "pelvis"),
    ("Abd/Becken 3mm", "", "abdomen"),
    ("Thorax Abdomen KM", "", "thorax"),
])
def test_shipped_rules_match_words_not_parts_of_words(description, body_part, protocol):
    protocols = load_protocols(SHIPPED)
    header = {"SeriesDescription": description, "BodyPartExamined": body_part}
    assert protocols.match(header).name == protocol


def test_shipped_rules_are_bounded_and_never_tied():
    from oncoseg_node.contouring.protocol_checks import match_warnings, unbounded_words

    protocols = load_protocols(SHIPPED)
    for protocol in protocols.protocols:
        for pattern in protocol.match.attributes.values():
            assert unbounded_words(pattern) == [], (protocol.name, pattern.pattern)
    assert match_warnings(protocols) == []


def test_unbounded_words_and_ties_that_can_both_match_warn(tmp_path):
    from oncoseg_node.contouring.protocol_checks import match_warnings

    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n  External: {color: [0, 255, 0], type: EXTERNAL}\n"
        "protocols:\n"
        "  - {name: hn, priority: 30, structures: [External],\n"
        "     match: {attributes: {SeriesDescription: 'head|hn'}}}\n"
        "  - {name: thorax, priority: 20, structures: [External],\n"
        "     match: {attributes: {SeriesDescription: '\\bthorax\\b'}}}\n"
        "  - {name: abdomen, priority: 20, structures: [External],\n"
        "     match: {attributes: {SeriesDescription: '\\babdomen\\b'}}}\n"
        "  - {name: thin, priority: 10, structures: [External],\n"
        "     match: {slice_thickness_mm: [0, 2]}}\n"
        "  - {name: thick, priority: 10, structures: [External],\n"
        "     match: {slice_thickness_mm: [2.5, 10]}}\n"
        "  - {name: ct1, priority: 5, structures: [External],\n"
        "     match: {attributes: {BodyPartExamined: '^CHEST$'}}}\n"
        "  - {name: ct2, priority: 5, structures: [External],\n"
        "     match: {attributes: {BodyPartExamined: '^PELVIS$'}}}\n")
    warnings = match_warnings(load_protocols(path))
    assert any(w.startswith("protocols.hn.match.attributes.SeriesDescription: 'hn' is not "
                            "bounded") for w in warnings), warnings
    assert not any("'head'" in w for w in warnings)  # 4 letters and more are words enough
    ties = [w for w in warnings if "same priority" in w]
    # "thorax abdomen" matches both; disjoint thickness ranges or anchored values cannot.
    assert ties == ["protocols.abdomen: same priority (20) as 'thorax' and a series can match "
                    "both; 'thorax' wins by file order alone: give them different priorities"]


def test_a_bad_structure_is_one_problem_not_one_per_protocol(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"
        "  External: {color: [0, 255, 0], type: EXTERNAL}\n"
        "  Heart: {color: [300, 0, 0]}\n"
        "protocols:\n"
        "  - {name: a, priority: 3, structures: [External, Heart], match: {attributes: {X: c}}}\n"
        "  - {name: b, priority: 2, structures: [Heart], match: {attributes: {X: a}}}\n"
        "  - {name: c, priority: 1, structures: [Heart, Liver], match: {attributes: {X: b}}}\n")
    with pytest.raises(ConfigError) as info:
        load_protocols(path)
    problems = info.value.problems
    assert [p for p in problems if "Heart" in p] == [
        f"{path}:3: structures.Heart.color: [300, 0, 0] is not [R, G, B] in 0..255"]
    # A structure never defined is still named where it is used.
    assert [p for p in problems if "Liver" in p] == [
        f"{path}:7: protocols.c.structures: unknown structure 'Liver'"]


def test_structures_no_configured_engine_contours_are_named():
    from oncoseg_node.config import EngineConfig
    from oncoseg_node.contouring.engines.registry import contourable
    from oncoseg_node.contouring.protocol_checks import absent_structures

    thorax = load_protocols(SHIPPED).by_name("thorax")
    classical = [s.name for s in absent_structures(thorax, contourable(EngineConfig()))]
    assert classical == ["Heart", "Esophagus", "SpinalCord", "A_Aorta", "Breast_L", "Breast_R"]
    assert absent_structures(thorax, contourable(EngineConfig(name="sam3"))) == []


def test_check_config_and_explain_warn_which_structures_will_be_absent(tmp_path):
    from oncoseg_node.commissioning.phantom import write_phantom

    config = str(REPO / "config" / "oncoseg-node.yaml")
    checked = run_cli("check-config", "--config", config)
    assert checked.returncode == 0, checked.stderr
    lines = [line for line in checked.stdout.splitlines() if line.startswith("warning: ")]
    by_protocol = {line.split(":")[1].strip(): line for line in lines}
    assert set(by_protocol) == {"protocols.head-and-neck", "protocols.thorax",
                                "protocols.abdomen", "protocols.pelvis"}, lines
    thorax = by_protocol["protocols.thorax"]
    assert "6 of its 14 structures" in thorax and "Heart (sam3)" in thorax
    assert "Trachea" not in thorax and "Lung_L" not in thorax
    write_phantom(tmp_path, slices=2, rows=32, columns=32, pixel_spacing=(10.0, 10.0))
    explained = run_cli("protocols", "explain", str(tmp_path), "--config", config)
    assert explained.returncode == 0, explained.stderr
    warned = [line for line in explained.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: protocols.thorax: no configured "
                                                     "engine contours 6 of its 14"), warned


def test_shipped_protocols_mark_what_only_sam3_contours():
    """In each shipped protocol the structures after '# sam3:' are exactly the SAM3 ones."""
    import re

    from oncoseg_node.config import EngineConfig
    from oncoseg_node.contouring.engines.registry import contourable
    from oncoseg_node.contouring.protocol_checks import absent_structures

    protocols = load_protocols(SHIPPED)
    text = SHIPPED.read_text()
    lists = re.findall(r"- name: (\S+)\n(?:.*\n)*?    structures: \[([^\]]*)\]", text)
    assert {name for name, _ in lists} == {p.name for p in protocols.protocols}
    for name, body in lists:
        marked = body.split("# sam3:")[1] if "# sam3:" in body else ""
        marked_names = re.findall(r"[A-Za-z][A-Za-z0-9_^]*", marked)
        absent = absent_structures(protocols.by_name(name), contourable(EngineConfig()))
        assert marked_names == [s.name for s in absent], name


def test_prompt_is_read_and_box_prompts_need_a_window(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "structures:\n"                                                                  # 1
        "  Lung_L: {color: [1, 2, 3], engine: sam3, hu_window: [-950, -500],\n"          # 2
        "           prompt: boxes}\n"                                                     # 3
        "  Liver: {color: [1, 2, 3], engine: sam3, concepts: [liver], prompt: text}\n"   # 4
        "  Heart: {color: [1, 2, 3], engine: sam3, concepts: [heart],\n"                 # 5
        "          hu_window: [0, 100]}\n"                                                # 6
        "  Bowel: {color: [1, 2, 3], engine: sam3, concepts: [bowel]}\n"                 # 7
        "protocols:\n"                                                                    # 8
        "  - name: a\n"                                                                   # 9
        "    structures: [Lung_L, Liver, Heart, Bowel]\n")                                # 10
    library = load_protocols(path).library
    assert [library[n].prompting for n in ("Lung_L", "Liver", "Heart", "Bowel")] == \
        ["boxes", "text", "text+boxes", "text"]
    path.write_text(path.read_text()
                    .replace("hu_window: [-950, -500],", "negative_concepts: [heart],")
                    .replace("prompt: text}", "prompt: txt}")
                    .replace("concepts: [bowel]}", "concepts: [bowel], prompt: text+boxes}"))
    assert_refused_with(path, [
        (3, "structures.Lung_L.prompt: boxes needs hu_window, the HU window"),
        (2, "structures.Lung_L.negative_concepts: not used with prompt: boxes"),
        (4, "structures.Liver.prompt: 'txt' is not one of text, text+boxes, boxes"),
        (7, "structures.Bowel.prompt: text+boxes needs hu_window"),
    ])
