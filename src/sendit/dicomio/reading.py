"""Reading a DICOM file, and deciding whether it is whole: the one place for both.

pydicom reads a file cut short without complaint, so every reader here checks what a cut leaves:

* header only (:func:`pixel_data_cut_short`, for ingest): the pixel element that follows the header
  declares more bytes than the file holds, or its undefined-length value has no closing delimiter
  near the end; one small read instead of the whole image;
* whole file (:func:`check_complete`, for de-identification; :func:`cut_short`, also for a header
  read that reached the end of a file without pixel data): the last element is shorter than its
  declared length; an undefined-length last element (sequence, encapsulated pixels) has no closing
  delimiter at the very end; an image has no pixel data at all (cut before it). A non-image object
  cut exactly between two top-level elements is indistinguishable from a shorter object, so a
  complete SR or RT plan is never called truncated.

Every reason for a cut starts with :data:`TRUNCATED`, the one wording ingest and `sendit deid` share.

Every failure is an :class:`UnreadableFile` whose reason names what is wrong, never a value from the
file (pydicom's own exception text may quote one, so it is dropped).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Literal

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from sendit.dicomio.quiet import quiet
from sendit.dicomio.tags import (
    PIXEL_DATA_TAGS,
    ROWS,
    SEQUENCE_DELIMITER_BE,
    SEQUENCE_DELIMITER_LE,
    SOP_CLASS_UID,
    UNDEFINED_LENGTH,
    tag_text,
)

# Never follow a link at the last step, never wait on a pipe; O_NOFOLLOW is missing on Windows.
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
#: How far from the end a header-only read looks for the delimiter that closes the pixel data
#: (elements may follow it: trailing padding, digital signatures).
_PIXEL_TAIL = 4096
#: The start of every reason given for a file cut short.
TRUNCATED = "truncated DICOM file"


class UnreadableFile(Exception):
    """A file that cannot be used as a DICOM object; ``reason`` carries no value from the file.

    ``truncated`` marks a file cut short (still being written, or damaged in transit) rather than one
    that is not DICOM at all.
    """

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated


def open_no_follow(path: Path) -> BinaryIO:
    """Open for reading without following a symbolic link or blocking on a pipe (ELOOP for a link)."""
    return open(path, "rb", opener=lambda name, flags: os.open(name, flags | _OPEN_FLAGS))


class DigestingReader:
    """A file open for reading that feeds every byte to SHA-256 once, in file order, while a reader
    (pydicom) consumes it, whatever it seeks: one pass over the disk gives both the parse and the
    file's content identity, and the digest is of exactly the bytes that were parsed (a file replaced
    between a separate hash and a separate read could not be told apart)."""

    CHUNK = 1 << 20

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._sha = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the digest

    def read(self, size: int = -1) -> bytes:
        start = self._handle.tell()
        if start > self._hashed:  # a forward seek skipped bytes: they go into the digest first, in order
            self._catch_up(start)
        data = self._handle.read(size)
        end = start + len(data)
        if end > self._hashed:
            self._sha.update(memoryview(data)[self._hashed - start :])
            self._hashed = end
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def _catch_up(self, until: int | None) -> None:
        """Hash from where the digest stopped up to ``until`` (None: the end of the file)."""
        here = self._handle.tell()
        self._handle.seek(self._hashed)
        while until is None or self._hashed < until:
            chunk = self._handle.read(self.CHUNK if until is None else min(self.CHUNK, until - self._hashed))
            if not chunk:
                break
            self._sha.update(chunk)
            self._hashed += len(chunk)
        self._handle.seek(here)

    def hexdigest(self) -> str:
        """The SHA-256 of the whole file (what the reader left unread is read now)."""
        self._catch_up(None)
        return self._sha.hexdigest()


def read_dicom_digest(path: Path) -> tuple[Dataset, str]:
    """:func:`read_dicom` of the whole file and the SHA-256 of its bytes, from one read of the file.

    A file that is not there raises FileNotFoundError (the relay tells "gone" from "unreadable")."""
    path = Path(path)
    with open(path, "rb") as handle:
        reader = DigestingReader(handle)
        ds = _parse(reader, path, headers_only=False)
        return ds, reader.hexdigest()


def read_dicom(path: Path, *, headers_only: bool = False) -> Dataset:
    """Read a Part 10 file; a non-DICOM or (unless ``headers_only``) truncated file is refused."""
    return _parse(Path(path), Path(path), headers_only=headers_only)


def _parse(source: Path | DigestingReader, path: Path, *, headers_only: bool) -> Dataset:
    try:
        with quiet():
            ds = dcmread(source, force=False, stop_before_pixels=headers_only)  # type: ignore[arg-type]
    except FileNotFoundError:
        raise UnreadableFile("file not found") from None
    except InvalidDicomError:
        raise UnreadableFile("not a DICOM file") from None
    except Exception as exc:  # pydicom raises many types for damaged files; the type only, no value
        raise UnreadableFile(f"unreadable DICOM file ({type(exc).__name__})") from None
    if not headers_only:
        check_complete(ds, path)
    return ds


def sop_class_and_syntax(path: Path) -> tuple[str, str]:
    """(SOPClassUID, TransferSyntaxUID) of a file we wrote ourselves, reading as little as possible."""
    with quiet():
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return str(ds.get("SOPClassUID", "")), syntax


def check_complete(ds: Dataset, path: Path) -> None:
    """Raise :class:`UnreadableFile` (``truncated``) when a whole read of ``path`` shows a cut."""
    cut = cut_short(ds, path)
    if cut:
        raise UnreadableFile(f"{TRUNCATED}: {cut}", truncated=True)


def cut_short(ds: Dataset, path: Path) -> str:
    """What shows that the file ``ds`` was read from ended early ('' when nothing does)."""
    keys = list(ds.keys())
    if not keys:
        return "no data elements"
    last_tag = keys[-1]
    last = ds.get_item(last_tag)
    if isinstance(last, RawDataElement):
        declared, value = last.length, last.value
        if declared != UNDEFINED_LENGTH and value is not None and len(value) < declared:
            return f"{tag_text(last_tag)} is shorter than its declared length"
    else:
        declared = UNDEFINED_LENGTH if last.is_undefined_length else 0
    if declared == UNDEFINED_LENGTH:
        with open(path, "rb") as handle:
            closed = _delimiter_in_tail(handle, 0, path.stat().st_size, ds.original_encoding[1] is not False, 8)
        if not closed:
            return f"{tag_text(last_tag)} has no closing delimiter"
    if not any(tag in ds for tag in PIXEL_DATA_TAGS) and (ROWS in ds or _is_image_class(ds)):
        return "an image without pixel data"
    return ""


def pixel_data_cut_short(handle: BinaryIO, start: int, size: int, little: bool | None, implicit: bool | None) -> bool:
    """True when the pixel element at ``start`` (where a header-only read stopped) declares more
    bytes than the file holds, or its undefined-length value has no closing delimiter near the end."""
    if start >= size:
        return False  # no pixel data (SR, RT plans, ...)
    head = handle.read(12)
    if len(head) < 8:
        return True
    order: Literal["little", "big"] = "little" if little in (True, None) else "big"
    group = int.from_bytes(head[0:2], order)
    element = int.from_bytes(head[2:4], order)
    if (group << 16 | element) not in PIXEL_DATA_TAGS:
        return False  # trailing elements after the pixel group are read elsewhere
    if implicit:
        length, header_length = int.from_bytes(head[4:8], order), 8
    else:
        if len(head) < 12:
            return True
        length, header_length = int.from_bytes(head[8:12], order), 12
    if length == UNDEFINED_LENGTH:
        return not _delimiter_in_tail(handle, start, size, order == "little", _PIXEL_TAIL)
    return start + header_length + length > size


def _delimiter_in_tail(handle: BinaryIO, start: int, size: int, little: bool, window: int) -> bool:
    """Whether the Sequence Delimitation Item stands in the last ``window`` bytes (not before ``start``)."""
    handle.seek(max(start, size - window))
    return (SEQUENCE_DELIMITER_LE if little else SEQUENCE_DELIMITER_BE) in handle.read(window)


def _is_image_class(ds: Dataset) -> bool:
    """The SOP class is a registered image storage class (so pixel data must be there)."""
    elem = ds.get_item(SOP_CLASS_UID)
    if elem is None or not elem.value:
        return False
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    first = value[0] if isinstance(value, MultiValue | list | tuple) else str(value).split("\\")[0]
    uid = str(first).strip(" \x00")
    return "Image Storage" in UID_dictionary.get(uid, ("",))[0]
