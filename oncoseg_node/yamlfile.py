"""Reading the node's YAML files so that every problem names its file and line.

Both the node config and the protocols file go through :func:`read_yaml`:
text that is not UTF-8, a YAML syntax error or a top level that is not a
mapping becomes one :class:`~oncoseg_node.errors.ConfigError` line,
``FILE:LINE:COLUMN: message``. :class:`DataclassParser` then builds a
frozen dataclass tree from the mapping, collecting every problem as ``key.path:
message``; :func:`line_index` and :func:`located` turn each into ``FILE:LINE:
key.path: message``, and :func:`unknown_key` words a typo with the closest
valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Read:
    """How :class:`DataclassParser` reads one field beyond what its type says.

    Set with :func:`read_as` in the field's metadata. ``check`` sees the value
    as written and returns what is then parsed by type, or raises ValueError
    whose text is the problem (``key: text``); a refused value leaves the
    field at its default. A required field's check sees a missing key as
    None, so that problem is worded like any other. ``each`` does the same for
    every item of a list or mapping; a refused item becomes None. ``key`` is
    the field's key in the file where it differs from the field's name.
    ``named_by``: a list item is named in problems by this key of its own
    (``protocols.thorax``), its index (``#2``) standing in for a missing one.
    ``key_field``: the values of a mapping take this field from their key in
    the mapping. ``in_file`` False: the loader sets the field, never the file.
    """

    check: Callable[[Any], Any] | None = None
    each: Callable[[Any], Any] | None = None
    key: str | None = None
    named_by: str | None = None
    key_field: str | None = None
    in_file: bool = True


PLAIN = Read()
# What a refused value is parsed into: the field keeps its default.
_REFUSED = object()


def read_as(**how: Any) -> dict[str, Read]:
    """Field metadata: ``field(default=..., metadata=read_as(check=...))``."""
    return {"read": Read(**how)}


def _how(fld: dataclasses.Field[Any]) -> Read:
    how = fld.metadata.get("read", PLAIN)
    assert isinstance(how, Read)
    return how


def _required(fld: dataclasses.Field[Any]) -> bool:
    return fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING


class DataclassParser:
    """Builds a frozen dataclass tree from YAML data, collecting every problem.

    Types read: dataclasses, ``X | None``, ``tuple[X, ...]``, ``Mapping[str,
    X]``, bool, int, float, str, :class:`~pathlib.Path` (relative to
    ``base_dir``) and ``re.Pattern``. A value of the wrong type is one
    problem naming its key and the value.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def build(self, cls: type, raw: Any, key: str, given: Mapping[str, Any] | None = None
              ) -> Any:
        """An instance of ``cls``; None when a required field is missing or refused.

        ``given`` are field values from outside the mapping (its key in a
        parent mapping); their problems are named by ``key`` itself.
        """
        if not isinstance(raw, dict):
            self.problems.append(f"{key}: expected a mapping, got {_show(raw)}")
            return None
        given = given or {}
        hints = typing.get_type_hints(cls)
        every = {f.name: f for f in dataclasses.fields(cls)}
        values = {name: self.read(hints[name], value, key, _how(every[name]))
                  for name, value in given.items()}
        fields = {(_how(f).key or f.name): f for f in every.values()
                  if _how(f).in_file and f.name not in given}
        for unknown in sorted(set(raw) - set(fields), key=str):
            self.problems.append(unknown_key(_join(key, unknown), unknown, fields))
        for name, fld in fields.items():
            # A required field's own check words what a missing value lacks.
            if name in raw or (_required(fld) and _how(fld).check is not None):
                values[fld.name] = self.read(hints[fld.name], raw.get(name), _join(key, name),
                                             _how(fld))
            elif _required(fld):
                self.problems.append(f"{_join(key, name)}: required key missing")
        try:
            return cls(**{k: v for k, v in values.items() if v is not _REFUSED})
        except TypeError:
            return None

    def read(self, hint: Any, raw: Any, key: str, how: Read = PLAIN) -> Any:
        """One field's value: its own check first, then by type."""
        raw = self.checked(how.check, raw, key)
        return raw if raw is _REFUSED else self.value(hint, raw, key, how)

    def checked(self, check: Callable[[Any], Any] | None, raw: Any, key: str) -> Any:
        """``raw`` as ``check`` returns it, or _REFUSED with the problem it words."""
        if check is None:
            return raw
        try:
            return check(raw)
        except ValueError as exc:
            self.problems.append(f"{key}: {exc}")
            return _REFUSED

    def value(self, hint: Any, raw: Any, key: str, how: Read = PLAIN) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if raw is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, raw, key, how)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.build(hint, raw if raw is not None else {}, key)
        if origin is tuple:
            return self.sequence(args[0], raw, key, how)
        if origin in (dict, Mapping):
            return self.mapping(args[1], raw, key, how)
        return self.scalar(hint, raw, key)

    def sequence(self, hint: Any, raw: Any, key: str, how: Read) -> tuple[Any, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.problems.append(f"{key}: expected a list, got {_show(raw)}")
            return ()
        items = []
        for i, item in enumerate(raw):
            item_key = f"{key}[{i}]"
            if how.named_by is not None and isinstance(item, dict):
                item = {how.named_by: f"#{i}", **item}
                item_key = f"{key}.{item[how.named_by]}"
            items.append(self.item(hint, item, item_key, how))
        return tuple(items)

    def mapping(self, hint: Any, raw: Any, key: str, how: Read) -> dict[Any, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{key}: expected a mapping, got {_show(raw)}")
            return {}
        return {name: self.item(hint, value, _join(key, name), how,
                                {how.key_field: name} if how.key_field else None)
                for name, value in raw.items()}

    def item(self, hint: Any, raw: Any, key: str, how: Read,
             given: Mapping[str, Any] | None = None) -> Any:
        """One item of a list or mapping: ``how.each`` first, then by type."""
        raw = self.checked(how.each, raw, key)
        if raw is _REFUSED:
            return None
        if given:
            return self.build(hint, raw if raw is not None else {}, key, given)
        return self.value(hint, raw, key)

    def scalar(self, hint: Any, raw: Any, key: str) -> Any:
        if hint is bool:
            if not isinstance(raw, bool):
                self.problems.append(f"{key}: expected true or false, got {_show(raw)}")
            return raw
        if hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.problems.append(f"{key}: expected an integer, got {_show(raw)}")
            return raw
        if hint is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                self.problems.append(f"{key}: expected a number, got {_show(raw)}")
                return raw
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                self.problems.append(f"{key}: expected a string, got {_show(raw)}")
            return raw
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                self.problems.append(f"{key}: expected a path, got {_show(raw)}")
                return raw
            path = Path(raw).expanduser()
            return path if path.is_absolute() else (self.base_dir / path).resolve()
        if hint is re.Pattern or typing.get_origin(hint) is re.Pattern:
            return self.pattern(raw, key)
        raise TypeError(f"unsupported field type {hint!r} at {key}")

    def pattern(self, raw: Any, key: str) -> re.Pattern[str] | None:
        if isinstance(raw, re.Pattern):
            return raw
        if not isinstance(raw, str):
            self.problems.append(f"{key}: expected a regular expression, got {_show(raw)}")
            return None
        try:
            return re.compile(raw)
        except re.error as exc:
            self.problems.append(f"{key}: {exc}")
            return None


def _join(key: str, name: object) -> str:
    return f"{key}.{name}" if key else str(name)


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."
