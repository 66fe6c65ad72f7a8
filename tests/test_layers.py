"""The package's stages import only earlier stages and the shared parts, never a later one.

Flow order: ledger, intake, contouring, rtstruct, delivery, ops, commissioning;
the shared parts (config, errors, durable, doorbell, dicom/) import no stage.
The command line (``cli*.py``) sits above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import oncoseg_node

ORDER = ["ledger", "intake", "contouring", "rtstruct", "delivery", "ops", "commissioning"]
PACKAGE = Path(oncoseg_node.__file__).parent
# config validates destination profile names against the profile table, which is
# pure data (no code of the stage runs); imported lazily inside the validator.
ALLOWED = {("oncoseg_node.config", "oncoseg_node.rtstruct.profiles")}


def stage(module: str) -> str | None:
    """The stage a module belongs to; None for the shared parts; "cli" for the CLI."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ORDER:
        return parts[1]
    if len(parts) > 1 and parts[1].startswith("cli"):
        return "cli"
    return None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("oncoseg_node")}


def test_no_stage_imports_a_later_one():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("oncoseg_node", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        mine = stage(module)
        if mine == "cli":
            continue
        for other in imports(path):
            theirs = stage(other)
            if theirs is None or (module, other) in ALLOWED:
                continue
            if mine is None or theirs == "cli" or ORDER.index(theirs) > ORDER.index(mine):
                wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_the_receiver_knows_nothing_of_delivery():
    for path in (PACKAGE / "intake").glob("*.py"):
        assert not any(m.startswith("oncoseg_node.delivery") for m in imports(path)), path
