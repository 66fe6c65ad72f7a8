"""``check-config`` and ``init``: the node config and its protocols file checked together.

One run lists every problem of both files, each as ``FILE:LINE: key:
message``, so an operator fixes everything in one pass: the protocols file
is checked even when the node config around it has problems (its path is
read from the config as written). ``init`` writes the packaged, commented
examples to a folder to edit; they are the very files the package runs on
when no ``--config`` is given.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from oncoseg_node.config import (
    DEFAULT_CONFIG,
    DEFAULT_PROTOCOLS,
    Config,
    http_warnings,
    load_config,
)
from oncoseg_node.contouring.protocol_report import warning_lines
from oncoseg_node.contouring.protocols import ProtocolSet, load_protocols
from oncoseg_node.errors import ConfigError, OncosegError
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.yamlfile import read_yaml


@dataclass
class CheckReport:
    """What one ``check-config`` run found; valid when ``problems`` is empty."""

    config_path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: Config | None = None
    protocols: ProtocolSet | None = None

    def summary(self) -> str:
        assert self.config is not None and self.protocols is not None
        return (f"{self.config_path}: valid ({len(self.protocols.protocols)} protocols, "
                f"{len(self.config.destinations)} destinations, "
                f"engine {self.config.engine.name}; state in {self.config.state_dir})")


def check_files(config_path: Path) -> CheckReport:
    """Check a node config and the protocols file it names; collects every problem."""
    report = CheckReport(Path(config_path))
    try:
        report.config = load_config(config_path)
    except ConfigError as exc:
        report.problems += exc.problems
    if report.config is not None:
        proto: Path | None = report.config.protocols
        limits = [PROFILES[d.profile].max_roi_name_length for d in report.config.destinations]
        limit = min(limits) if limits else None
    else:
        proto, limit = protocols_path(config_path), None
    if proto is not None and proto.exists():  # a missing file is already a config problem
        try:
            report.protocols = load_protocols(proto, limit)
        except ConfigError as exc:
            report.problems += exc.problems
    report.problems = _by_file_and_line(report.problems)
    if report.config is not None and report.protocols is not None:
        report.warnings = warning_lines(report.config, report.protocols)
    if report.config is not None:
        report.warnings += [f"warning: {line}" for line in http_warnings(report.config.http)]
    return report


def protocols_path(config_path: Path | str) -> Path | None:
    """The protocols file a node config names, even when the config is otherwise invalid."""
    config_path = Path(config_path)
    try:
        raw, _ = read_yaml(config_path)
    except ConfigError:
        return None
    value = raw.get("protocols")
    if not isinstance(value, str) or not value:
        return None
    protocols = Path(value).expanduser()
    return protocols if protocols.is_absolute() else (config_path.resolve().parent / protocols)


def _by_file_and_line(problems: list[str]) -> list[str]:
    """Each file's problems in line order; files in the order they were checked."""
    files: list[str] = []

    def key(problem: str) -> tuple[int, int]:
        path, _, rest = problem.partition(":")
        if path not in files:
            files.append(path)
        line = rest.split(":", 1)[0]
        return files.index(path), int(line) if line.isdigit() else 0

    return sorted(problems, key=key)


def write_examples(directory: Path, *, force: bool = False) -> list[Path]:
    """Copy the packaged config and protocols into ``directory``; never overwrites unasked."""
    directory = Path(directory)
    targets = [(DEFAULT_CONFIG, directory / "oncoseg-node.yaml"),
               (DEFAULT_PROTOCOLS, directory / "protocols.yaml")]
    existing = [str(target) for _, target in targets if target.exists()]
    if existing and not force:
        raise OncosegError(f"{', '.join(existing)} already exist(s); edit it, or pass --force "
                           "to overwrite with the examples")
    directory.mkdir(parents=True, exist_ok=True)
    for source, target in targets:
        shutil.copyfile(source, target)  # the content, not a link into the package
    return [target for _, target in targets]
