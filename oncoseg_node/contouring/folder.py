"""Offline folders as physicists have them: which files hold which CT series.

An export from a planning system or PACS rarely holds one clean series: a
README, a DICOMDIR, the structure set of an earlier plan, a scout or a second
reconstruction sit beside the images. :func:`scan_folder` reads every file's
header once (pixels are not read), skips what is not DICOM and DICOMDIRs,
ignores objects that are not CT images, and groups the CT images by Series
Instance UID; :meth:`FolderScan.choose` picks one series or says which ones
there are. Used by ``segment``, ``protocols explain`` and ``evaluate``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, MediaStorageDirectoryStorage

from oncoseg_node.errors import SeriesLoadError


@dataclass(frozen=True)
class FolderSeries:
    """The CT images of one series found in a folder (files sorted by name)."""

    uid: str
    description: str
    paths: tuple[Path, ...]

    def describe(self) -> str:
        description = f'"{self.description}"' if self.description else "(no description)"
        return f"{self.uid or '(empty SeriesInstanceUID)'}  {description}  {len(self.paths)} slices"


@dataclass
class FolderScan:
    """What a folder holds: CT series by UID, and what was skipped or ignored."""

    directory: Path
    series: dict[str, FolderSeries] = field(default_factory=dict)
    non_dicom: list[Path] = field(default_factory=list)
    dicomdirs: list[Path] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)  # modality -> files

    def skipped_summary(self) -> str:
        """e.g. "skipped 1 non-DICOM file, 1 DICOMDIR; ignored 1 RTSTRUCT" ("" if nothing)."""
        skipped = []
        if self.non_dicom:
            skipped.append(_count(len(self.non_dicom), "non-DICOM file"))
        if self.dicomdirs:
            skipped.append(_count(len(self.dicomdirs), "DICOMDIR"))
        parts = []
        if skipped:
            parts.append("skipped " + ", ".join(skipped))
        if self.ignored:
            parts.append("ignored " + ", ".join(
                f"{n} {modality}" for modality, n in sorted(self.ignored.items())))
        return "; ".join(parts)

    def listing(self) -> list[str]:
        """One line per CT series: UID, description and slice count."""
        return [s.describe() for s in sorted(self.series.values(), key=lambda s: s.uid)]

    def choose(self, series_uid: str | None = None) -> FolderSeries:
        """The series ``series_uid``, or the only CT series in the folder.

        Raises :class:`SeriesLoadError` (one line) when there is no CT series,
        when ``series_uid`` is not among them, or when there are several and
        none was chosen; :class:`SeveralSeries` in that last case carries the
        listing for the caller to show.
        """
        if not self.series:
            extra = self.skipped_summary()
            raise SeriesLoadError(f"{self.directory}: no CT images"
                                  + (f" ({extra})" if extra else ""))
        if series_uid is not None:
            try:
                return self.series[series_uid]
            except KeyError:
                raise SeriesLoadError(
                    f"{self.directory}: no CT series {series_uid} (it holds "
                    f"{', '.join(sorted(self.series))})") from None
        if len(self.series) > 1:
            raise SeveralSeries(self)
        return next(iter(self.series.values()))


class SeveralSeries(SeriesLoadError):
    """Raised by :meth:`FolderScan.choose` when a folder holds several CT series
    and none was named; ``scan.listing()`` names them for the operator."""

    def __init__(self, scan: FolderScan) -> None:
        self.scan = scan
        super().__init__(f"{scan.directory} holds {len(scan.series)} CT series: "
                         "choose one with --series UID")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _read_header(path: Path) -> Dataset | None:
    """The file's header, or None when it is not DICOM.

    Files without the 128-byte preamble (older exports write bare datasets)
    are read with ``force`` and kept only if they carry a SOP Class and
    Instance UID, so a text file is never taken for an image.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - a damaged DICOM file is not one we can use
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            str(ds.SOPClassUID)  # decoding a random file's "UID" must work too
            return ds
    except Exception:  # noqa: BLE001 - whatever force made of a non-DICOM file
        pass
    return None


def scan_folder(directory: Path | str) -> FolderScan:
    """Read the headers of every file in ``directory`` (not recursive; hidden files skipped)."""
    directory = Path(directory)
    if not directory.exists():
        raise SeriesLoadError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise SeriesLoadError(f"{directory}: not a folder")
    scan = FolderScan(directory)
    grouped: dict[str, list[Path]] = {}
    descriptions: dict[str, str] = {}
    for path in sorted(p for p in directory.iterdir()
                       if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None:
            scan.non_dicom.append(path)
            continue
        meta_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
        if meta_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
            scan.dicomdirs.append(path)
            continue
        if str(ds.get("SOPClassUID", "")) != CTImageStorage:
            scan.ignored[str(ds.get("Modality", "") or "unknown modality")] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        grouped.setdefault(uid, []).append(path)
        descriptions.setdefault(uid, str(ds.get("SeriesDescription", "") or ""))
    for uid, paths in grouped.items():
        scan.series[uid] = FolderSeries(uid, descriptions[uid], tuple(paths))
    return scan


def series_paths(directory: Path | str, series_uid: str | None = None,
                 prefer_uid: str | None = None,
                 say: Callable[[str], None] = print) -> list[Path]:
    """The files of one CT series in ``directory``, saying what was taken and skipped.

    With several CT series and none named, they are listed through ``say``
    (UID, description, slice count) before :class:`SeveralSeries` is raised.
    ``prefer_uid`` (e.g. the series a reference structure set is drawn on) is
    taken when the folder holds it and no series was named.
    """
    directory = Path(directory)
    scan = scan_folder(directory)
    if series_uid is None and prefer_uid is not None and prefer_uid in scan.series:
        series_uid = prefer_uid
    try:
        chosen = scan.choose(series_uid)
    except SeveralSeries:
        for line in scan.listing():
            say(f"  {line}")
        raise
    notes = [scan.skipped_summary()] if scan.skipped_summary() else []
    if len(scan.series) > 1:
        notes.append(f"{len(scan.series) - 1} other CT series not taken")
    say(f"{directory}: series {chosen.describe()}"
        + (f" ({'; '.join(notes)})" if notes else ""))
    return list(chosen.paths)


def output_path(output: Path) -> tuple[Path, bool]:
    """Check where an offline command writes, before any work: (path, is a folder).

    An existing folder means "write ``RS.<SOP Instance UID>.dcm`` inside it";
    otherwise the file's folder must exist. Either must be writable.
    """
    output = Path(output)
    if output.is_dir():
        folder, is_folder = output, True
    else:
        folder, is_folder = output.parent, False
        if not folder.is_dir():
            raise SeriesLoadError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeriesLoadError(f"output folder {folder} is not writable")
    return output, is_folder
