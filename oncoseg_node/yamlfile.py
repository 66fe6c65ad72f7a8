"""Reading the node's YAML files so that every problem names its file and line.

Both the node config and the protocols file go through :func:`read_yaml`:
text that is not UTF-8, a YAML syntax error or a top level that is not a
mapping becomes one :class:`~oncoseg_node.errors.ConfigError` line,
``FILE:LINE:COLUMN: message``. :func:`line_index` and :func:`located` then
turn each later problem (``key.path: message``) into ``FILE:LINE: key.path:
message``, and :func:`unknown_key` words a typo with the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from oncoseg_node.errors import ConfigError

# libyaml when PyYAML was built with it: the node refuses a second start in well
# under a second only if reading the 45-structure protocols file is quick.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """The file's top-level mapping and its text; an empty file is an empty mapping."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a YAML file"], source=str(path)) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"],
                          source=str(path)) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                           f"offset {exc.start}); save the file as UTF-8"],
                          source=str(path)) from None
    try:
        raw = yaml.load(text, Loader=FAST_LOADER)
    except yaml.YAMLError:
        try:  # parsed again by PyYAML's own parser: its messages say more than libyaml's
            yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([_syntax_error(path, exc)], source=str(path)) from None
        raise

    if raw is None:
        return {}, text
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}:1: expected a mapping of keys at the top level, got a "
                           f"{type(raw).__name__}"], source=str(path))
    return raw, text


def _syntax_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line: where the parser stopped and why (PyYAML spreads it over several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    detail = problem
    if context:
        detail += f" ({context}"
        if context_mark is not None and mark is not None and context_mark.line != mark.line:
            detail += f" at line {context_mark.line + 1}"
        detail += ")"
    return f"{where}: not valid YAML: {detail}"


def line_index(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line; list items are keyed by their ``name`` or index."""
    index: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                index.setdefault(path, key.start_mark.line + 1)  # first of duplicates
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                name = None
                if isinstance(item, yaml.MappingNode):
                    name = next((v.value for k, v in item.value if k.value == "name"), None)
                index.setdefault(f"{prefix}[{i}]", item.start_mark.line + 1)
                path = f"{prefix}.{name}" if name is not None else f"{prefix}[{i}]"
                index.setdefault(path, item.start_mark.line + 1)
                walk(item, path)
                if name is not None:
                    walk(item, f"{prefix}[{i}]")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, "")
    return index


def located(problems: Iterable[str], path: Path, lines: dict[str, int]) -> list[str]:
    """Prefix each ``key: message`` problem with FILE:LINE of the deepest key it names."""
    out = []
    for problem in problems:
        key = problem.split(": ", 1)[0]
        while key and key not in lines:
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        out.append(f"{path}:{lines.get(key, 1)}: {problem}")
    return out


def unknown_key(key_path: str, name: str, valid: Iterable[str]) -> str:
    """``key.path: unknown key``, with the closest valid key when one is close."""
    close = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key_path}: unknown key{hint}"
