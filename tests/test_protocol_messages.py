"""The protocols file's problems keep their wording: each one an operator meets as
``FILE:LINE: key: message`` from ``check-config``, the shapes and values the parser
checks with the protocols' own words as well as the cross-references."""

from __future__ import annotations

import pytest

from oncoseg_node.contouring.protocols import load_protocols
from oncoseg_node.errors import ConfigError

ONE_STRUCTURE = "structures:\n  External: {color: [0, 255, 0], type: EXTERNAL}\n"
ONE_PROTOCOL = "protocols:\n  - name: a\n    structures: [External]\n"


@pytest.mark.parametrize(("text", "line", "message"), [
    ("structures: [External]\n" + ONE_PROTOCOL,
     1, "structures: expected a mapping of structure name -> fields"),
    (ONE_STRUCTURE + "protocols: {a: [External]}\n", 3, "protocols: expected a list of protocols"),
    (ONE_STRUCTURE + "protocols: []\n", 3, "protocols: no protocol defined"),
    (ONE_STRUCTURE + "protocols:\n  - 5\n",
     4, "protocols[0]: expected a mapping with name, match and structures, got 5"),
    ("structures:\n  External: [0, 255, 0]\n" + ONE_PROTOCOL,
     2, "structures.External: expected a mapping of fields, got [0, 255, 0]"),
    ("structures:\n  External: {type: EXTERNAL}\n" + ONE_PROTOCOL,
     2, "structures.External.color: None is not [R, G, B] in 0..255"),
    ("structures:\n  External: {color: [1, 2, 3], type: organic}\n" + ONE_PROTOCOL,
     2, "structures.External.type: 'ORGANIC' is not an RTROIInterpretedType"),
    ("structures:\n  External: {color: [1, 2, 3], engine: magic}\n" + ONE_PROTOCOL,
     2, "structures.External.engine: 'magic' is not one of ['classical', 'sam3']"),
    ("structures:\n  External: {color: [1, 2, 3], laterality: middle}\n" + ONE_PROTOCOL,
     2, "structures.External.laterality: 'middle' is not left or right"),
    ("structures:\n  External: {color: [1, 2, 3], colour: red}\n" + ONE_PROTOCOL,
     2, "structures.External.colour: unknown key (did you mean 'color'?)"),
    ("structures:\n  External: {color: [1, 2, 3], postprocess: 5}\n" + ONE_PROTOCOL,
     2, "structures.External.postprocess: 5 is not a mapping"),
    ("structures:\n  External: {color: [1, 2, 3], postprocess: {fill_holes: maybe}}\n"
     + ONE_PROTOCOL, 2, "structures.External.postprocess.fill_holes: 'maybe' is not true or false"),
    (ONE_STRUCTURE + "protocols:\n  - structures: [External, Kidney]\n",
     3, "protocols.#0.structures: unknown structure 'Kidney'"),
    (ONE_STRUCTURE + "protocols:\n  - {name: a, structure: [External]}\n",
     4, "protocols.a.structure: unknown key (did you mean 'structures'?)"),
    (ONE_STRUCTURE + "protocols:\n  - {name: a, match: {attribute: {X: a}}}\n",
     4, "protocols.a.match.attribute: unknown key (did you mean 'attributes'?)"),
    (ONE_STRUCTURE + "protocols:\n  - {name: a, priority: 2, match: {attributes: {X: a}}}\n"
     "  - {name: a, priority: 1, match: {attributes: {X: b}}}\n",
     4, "protocols.a: name used twice"),
])
def test_problems_keep_their_wording(tmp_path, text, line, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_protocols(path)
    assert f"{path}:{line}: {message}" in info.value.problems, info.value.problems
