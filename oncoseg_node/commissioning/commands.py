"""The commissioning commands behind ``oncoseg-node evaluate`` and ``oncoseg-node phantom``.

The CLI parses the arguments and calls these; each prints what a physicist
reads and writes the files asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from oncoseg_node.commissioning.cases import CaseResult, evaluate_case, evaluate_folder
from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.commissioning.phantom_files import with_new_uids, write_reference
from oncoseg_node.commissioning.report import aggregate_lines, to_csv, to_html, to_table
from oncoseg_node.config import load_config
from oncoseg_node.errors import OncosegError


def case_name(series_dir: Path) -> str:
    """A case's name: its folder, or the folder above a ``ct/`` folder."""
    resolved = Path(series_dir).resolve()
    return resolved.parent.name if resolved.name.lower() == "ct" else resolved.name


def check_output_file(path: Path) -> None:
    """A report file can be written at ``path``: its folder exists and is writable."""
    if path.is_dir():
        raise OncosegError(f"{path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise OncosegError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OncosegError(f"output folder {folder} is not writable")


def read_aliases(path: Path | None) -> dict[str, str]:
    """The reference-name -> TG-263 map of ``--alias-map`` (empty without one)."""
    aliases = yaml.safe_load(Path(path).read_text()) if path else {}
    if not isinstance(aliases, dict):
        raise OncosegError(f"{path}: expected a mapping of reference name -> TG-263")
    return aliases


def evaluate(*, config_path: Path, series: Path | None = None, reference: Path | None = None,
             ours: Path | None = None, cases: Path | None = None,
             series_uid: str | None = None, alias_map: Path | None = None,
             csv_path: Path | None = None, html_path: Path | None = None) -> list[CaseResult]:
    """One case (``series`` + ``reference``) or a folder of ``cases``; prints the tables.

    The files to write and the alias map are checked before any case is read.
    """
    for target in (csv_path, html_path):
        if target is not None:
            check_output_file(Path(target))
    if alias_map is not None and not Path(alias_map).is_file():
        raise OncosegError(f"{alias_map}: no such alias map file")
    aliases = read_aliases(alias_map)
    if cases:
        results = evaluate_folder(Path(cases), config_path=config_path, aliases=aliases)
    elif series and reference:
        results = [evaluate_case(Path(series), Path(reference), Path(ours) if ours else None,
                                 case=case_name(Path(series)), config_path=config_path,
                                 aliases=aliases, series_uid=series_uid)]
    else:
        raise OncosegError("give --series and --reference, or --cases")
    print(to_table(results))
    if cases:
        print("\nper structure over cases: median [IQR]")
        print("\n".join(aggregate_lines(results)))
    if csv_path:
        Path(csv_path).write_text(to_csv(results))
    if html_path:
        Path(html_path).write_text(to_html(results))
    return results


def phantom(out_dir: Path, *, slices: int, size: int, position: str, site: str,
            new_uids: bool, reference: Path | None, config_path: Path) -> None:
    """Write the phantom series, and with ``reference`` its truth as a structure set."""
    made = write_phantom(Path(out_dir), slices=slices, rows=size, columns=size,
                         patient_position=position, site=site,
                         renew=with_new_uids if new_uids else None)
    print(f"{out_dir}: {len(made.datasets)} CT slices, series "
          f"{made.volume.series_instance_uid}, structures {', '.join(sorted(made.truth))}")
    if reference:
        config = load_config(config_path) if Path(config_path).is_file() else None
        count = write_reference(made, reference, config.protocols if config else None)
        print(f"{reference}: reference structure set, {count} structures")
