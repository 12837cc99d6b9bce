"""Header-only reading of one file, and the checks that decide whether it can enter the pipeline.

Pixel data is never loaded here; whether the file is whole is decided by
:func:`sendit.dicomio.reading.pixel_data_cut_short` from the pixel element's declared length against
the file size, which costs one small read instead of the whole image. A file whose header read
reached its end (no pixel data) is called truncated only when :func:`~sendit.dicomio.reading.cut_short`
sees a cut: an SR or RT plan without a UID is just that, not "truncated".

The reasons here are the ones ingest and `sendit deid` report, word for word; the engine words a
missing UID the same way (:func:`missing_uids`).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import MAX_VALUE_LEN

from sendit.dicomio.quiet import quiet
from sendit.dicomio.reading import TRUNCATED, cut_short, open_no_follow, pixel_data_cut_short
from sendit.dicomio.tags import MEDIA_STORAGE_DIRECTORY_CLASS, tag_text, tags_of
from sendit.dicomio.walk import NOT_REGULAR, SYMLINK
from sendit.identifiers.base import SeriesHeader

_UID_MAX = MAX_VALUE_LEN["UI"]
#: The UIDs a file needs to enter the pipeline (and the engine to write it), keyword → tag, in order.
REQUIRED_UIDS: Mapping[str, int] = {
    name: next(iter(tags_of(name))) for name in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
}


def missing_uids(names: Sequence[str]) -> str:
    """The one wording for missing UIDs: ``(0008,0018) SOPInstanceUID is missing``; several are listed."""
    listed = ", ".join(tag_text(REQUIRED_UIDS[name]) for name in names)
    return f"{listed} {'is' if len(names) == 1 else 'are'} missing"


@dataclass(frozen=True)
class FileHeader:
    """What ingest (and `sendit deid`) needs from one file to group it; identifying values stay inside the database."""

    sop_instance_uid: str
    sop_class_uid: str
    series: SeriesHeader
    transfer_syntax_uid: str
    size: int


@dataclass(frozen=True)
class RejectedFile:
    """A file that cannot enter the pipeline; ``skip`` marks files that are fine but not images.

    ``gone`` marks a file that vanished between the folder listing and the read (moved on by its
    producer, or cleaned up): nothing to record, the next scan sees whatever is there.
    """

    reason: str
    skip: bool = False
    gone: bool = False


def _text(value: object) -> str:
    """A header value as text; NUL characters (padding, or damage) are dropped: no database takes them."""
    return "" if value is None else str(value).replace("\x00", "").strip()


def _uid_problem(name: str, value: str) -> str:
    """A UID is a key in the database: control characters (a NUL) would fail the whole batch's insert."""
    if not value.isprintable() or " " in value:
        return f"{name} holds characters a UID cannot hold (not a valid UID)"
    return ""


def read_header(path: Path) -> FileHeader | RejectedFile:
    """Read one file's header; never raises, returns the reason instead.

    pydicom's warnings quote the offending value (a patient's name, a date): they are silenced here so
    that no such value reaches a log, and no reason carries a value from the file. A symbolic link is
    not followed (rejected), and nothing but a regular file is read.
    """
    with quiet():
        try:
            return _read_header(path)
        except Exception as exc:  # a last line: one file's surprise must never stop a scan
            return RejectedFile(f"unreadable DICOM header ({type(exc).__name__})")


def _read_header(path: Path) -> FileHeader | RejectedFile:
    try:
        handle = open_no_follow(path)
    except (FileNotFoundError, NotADirectoryError):
        return RejectedFile("file vanished before it was read", gone=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return RejectedFile(SYMLINK)
        return RejectedFile(f"cannot read file ({exc.strerror})")
    with handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            return RejectedFile(NOT_REGULAR)
        return _parse_header(handle, status.st_size, path)


def read_header_of_bytes(data: bytes, path: Path) -> FileHeader | RejectedFile:
    """:func:`read_header` of a file whose bytes are at hand (an instance the listener just received
    and wrote to ``path``): the same rules and reasons, without reading the file back."""
    with quiet():
        try:
            return _parse_header(io.BytesIO(data), len(data), path)
        except Exception as exc:  # a last line, as in read_header
            return RejectedFile(f"unreadable DICOM header ({type(exc).__name__})")


def _parse_header(handle: BinaryIO, size: int, path: Path) -> FileHeader | RejectedFile:
    """The header rules, on an open file of ``size`` bytes (``path`` names it for a truncation's reason)."""
    if size == 0:
        return RejectedFile("empty file")
    try:
        ds = dcmread(handle, stop_before_pixels=True)
        pixel_start = handle.tell()
        if pixel_data_cut_short(handle, pixel_start, size, ds.is_little_endian, ds.is_implicit_VR):
            return RejectedFile(f"{TRUNCATED}: pixel data shorter than declared")
        # every value is read inside this ``try``: pydicom converts lazily, and an unknown VR or a
        # damaged value raises only here
        return _header_of(ds, path, pixel_start, size)
    except InvalidDicomError:
        return RejectedFile("not a DICOM file (no DICM preamble or valid header)")
    except (EOFError, struct.error):
        return RejectedFile(f"{TRUNCATED}: header ends early")
    except Exception as exc:  # pydicom raises many types for damaged headers; the type only, no value
        return RejectedFile(f"unreadable DICOM header ({type(exc).__name__})")


def _header_of(ds: Dataset, path: Path, pixel_start: int, size: int) -> FileHeader | RejectedFile:
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds.get("SOPClassUID")) or _text(meta.get("MediaStorageSOPClassUID") if meta else "")
    if sop_class == MEDIA_STORAGE_DIRECTORY_CLASS or "DirectoryRecordSequence" in ds:
        return RejectedFile("DICOMDIR media directory, not an image", skip=True)
    uid_names = tuple(REQUIRED_UIDS)
    uids = {name: _text(ds.get(name)) for name in uid_names}
    missing = [name for name in uid_names if not uids[name]]
    if missing:
        cut = cut_short(ds, path) if pixel_start >= size else ""  # the header read reached the end
        return RejectedFile(f"{TRUNCATED}: {cut}; {missing_uids(missing)}" if cut else missing_uids(missing))
    too_long = [name for name in uid_names if len(uids[name]) > _UID_MAX]
    if too_long:
        return RejectedFile(", ".join(too_long) + f" longer than {_UID_MAX} characters (not a valid UID)")
    for name in uid_names:
        problem = _uid_problem(name, uids[name])
        if problem:
            return RejectedFile(problem)
    transfer = _text(meta.get("TransferSyntaxUID")) if meta is not None else ""
    series = SeriesHeader(
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        patient_id=_text(ds.get("PatientID")),
        patient_name=_text(ds.get("PatientName")),
        patient_birth_date=_text(ds.get("PatientBirthDate")),
        accession_number=_text(ds.get("AccessionNumber")),
        study_date=_text(ds.get("StudyDate")),
        study_time=_text(ds.get("StudyTime")),
        modality=_text(ds.get("Modality")),
    )
    return FileHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=sop_class,
        series=series,
        transfer_syntax_uid=transfer or "1.2.840.10008.1.2",
        size=size,
    )
