"""Header-only reading of one file, and the checks that decide whether it can enter the pipeline.

Pixel data is never loaded here; a truncated file is detected from the pixel element's declared
length against the file size, which costs one small read instead of the whole image.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from sendit.identifiers.base import SeriesHeader

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class FileHeader:
    """What ingest needs from one file; identifying values stay inside the database."""

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


SYMLINK = "symbolic link; not followed"
NOT_REGULAR = "not a regular file (a device, pipe or socket)"
# Never follow a link at the last step, never wait on a pipe; O_NOFOLLOW is missing on Windows.
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _read_header(path)
        except Exception as exc:  # a last line: one file's surprise must never stop a scan
            return RejectedFile(f"unreadable DICOM header ({type(exc).__name__})")


def _open(path: Path) -> BinaryIO:
    return open(path, "rb", opener=lambda name, flags: os.open(name, flags | _OPEN_FLAGS))


def _read_header(path: Path) -> FileHeader | RejectedFile:
    try:
        handle = _open(path)
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
        size = status.st_size
        if size == 0:
            return RejectedFile("empty file")
        try:
            ds = dcmread(handle, stop_before_pixels=True)
            pixel_start = handle.tell()
            truncated = _pixel_data_truncated(handle, pixel_start, size, ds.is_little_endian, ds.is_implicit_VR)
            if truncated:
                return RejectedFile("truncated DICOM file (pixel data shorter than declared)")
            # every value is read inside this ``try``: pydicom converts lazily, and an unknown VR or a
            # damaged value raises only here
            return _header_of(ds, pixel_start, size)
        except InvalidDicomError:
            return RejectedFile("not a DICOM file (no DICM preamble or valid header)")
        except (EOFError, struct.error):
            return RejectedFile("truncated DICOM file (header ends early)")
        except Exception as exc:  # pydicom raises many types for damaged headers; the type only, no value
            return RejectedFile(f"unreadable DICOM header ({type(exc).__name__})")


def _header_of(ds: Dataset, pixel_start: int, size: int) -> FileHeader | RejectedFile:
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds.get("SOPClassUID")) or _text(meta.get("MediaStorageSOPClassUID") if meta else "")
    if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return RejectedFile("DICOMDIR media directory, not an image", skip=True)
    uid_names = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    uids = {name: _text(ds.get(name)) for name in uid_names}
    missing = [name for name in uid_names if not uids[name]]
    if missing:
        ended_early = pixel_start >= size
        return RejectedFile("missing " + ", ".join(missing) + (" (the file may be truncated)" if ended_early else ""))
    too_long = [name for name in uid_names if len(uids[name]) > 64]
    if too_long:
        return RejectedFile(", ".join(too_long) + " longer than 64 characters (not a valid UID)")
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


def _pixel_data_truncated(handle: object, start: int, size: int, little: bool | None, implicit: bool | None) -> bool:
    """True when the pixel element that follows the header declares more bytes than the file holds."""
    if start >= size:
        return False  # no pixel data (SR, RT plans, ...)
    read = handle.read  # type: ignore[attr-defined]
    head = read(12)
    if len(head) < 8:
        return True
    endian = "<" if little in (True, None) else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group, element) not in PIXEL_TAGS:
        return False  # trailing elements after the pixel group are read elsewhere
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
        header_length = 8
    else:
        if len(head) < 12:
            return True
        (length,) = struct.unpack(endian + "L", head[8:12])
        header_length = 12
    if length == UNDEFINED_LENGTH:
        handle.seek(max(start, size - 4096))  # type: ignore[attr-defined]
        return SEQUENCE_DELIMITER not in read(4096)
    return start + header_length + length > size
