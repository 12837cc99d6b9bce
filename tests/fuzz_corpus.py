"""A seeded corpus of hostile entries for a watched folder, beside valid files (the chaos suite).

Hostile *content* is written under plain ASCII names, so that a test can find its row by path;
hostile *names* hold valid DICOM content, so that a test can find its row by SOPInstanceUID (the
way a non-UTF-8 name is stored is Sendit's choice). Symlinks point at files outside the folder whose
access time is set in the past: a read of the target shows as a newer access time (relatime).
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from sendit import demo

# PS3.5 7.1.2: these VRs have a reserved 2 bytes and a 4-byte length in explicit VR little endian
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
PATIENT_NAME = struct.pack("<HH", 0x0010, 0x0010)
PIXEL_DATA = struct.pack("<HH", 0x7FE0, 0x0010)
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
PATH_MAX = 4096
OLD_ATIME = 1_000_000_000  # 2001: any read of the file moves its access time to now


@dataclass
class Corpus:
    """What was written, and what each entry should end as."""

    root: Path
    # SOPInstanceUID -> description: valid DICOM content (under a plain or a hostile name); must end DONE
    valid: dict[str, str] = field(default_factory=dict)
    # SOPInstanceUID -> description: valid content under a very long path; DONE, or refused with a reason
    long: dict[str, str] = field(default_factory=dict)
    # SOPInstanceUID -> the file's path inside the folder, as bytes (valid and long entries)
    raw_paths: dict[str, bytes] = field(default_factory=dict)
    # path inside the folder -> description: damaged content; must end SKIPPED or QUARANTINED with a reason
    rejected: dict[str, str] = field(default_factory=dict)
    # path inside the folder -> description: well-formed but odd; may end DONE, or be refused with a reason
    odd: dict[str, str] = field(default_factory=dict)
    # SOPInstanceUID of each odd entry -> its path (to find it by UID too)
    odd_uids: dict[str, str] = field(default_factory=dict)
    # byte strings that were in the odd entries' names and values and must not reach an output file
    odd_values: list[bytes] = field(default_factory=list)
    # path inside the folder -> what it points at; must be refused once with a reason, its target never read
    symlinks: dict[str, str] = field(default_factory=dict)
    # SOPInstanceUIDs of DICOM files outside the folder that a symlink points at: never ingested or delivered
    outside_uids: set[str] = field(default_factory=set)
    # files outside the folder that must never be read (access time stays OLD_ATIME)
    never_read: list[Path] = field(default_factory=list)


class ImageMaker:
    """Tiny valid DICOM images of one patient, in series of a few images (fresh UIDs every time)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pixels = np.random.default_rng(seed)
        self.patient = demo.make_patient(self.rng, 3)
        self.study = demo.Study.fresh(self.rng, study_id="42", date="20210405", time="101500")
        self.series_uid = demo.generate_uid(prefix=demo.UID_ROOT)
        self.instance = 0

    def dataset(self) -> Dataset:
        self.instance += 1
        return demo.make_image(self.patient, self.study, self.series_uid, 1, "CT", self.instance, 16, self.pixels)


def to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uid_of(data: bytes) -> str:
    return str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def element_offset(data: bytes, tag: bytes) -> int:
    """Offset of the first element with this tag after the file meta (explicit VR little endian)."""
    start = data.index(b"DICM") + 4
    meta_length = struct.unpack("<L", data[start + 8 : start + 12])[0]
    return data.index(tag, start + 12 + meta_length)


def with_huge_length(data: bytes, tag: bytes) -> bytes:
    """The element's declared length set to ~4 GiB (a long-form VR keeps its VR; others become UN)."""
    at = element_offset(data, tag)
    vr = data[at + 4 : at + 6]
    length = struct.pack("<L", 0xFFFFFFF0)
    if vr in LONG_VRS:
        return data[: at + 8] + length + data[at + 12 :]
    old = struct.unpack("<H", data[at + 6 : at + 8])[0]
    return data[:at] + tag + b"UN\x00\x00" + length + data[at + 8 + old :]


def with_vr(data: bytes, tag: bytes, vr: bytes) -> bytes:
    at = element_offset(data, tag)
    return data[: at + 4] + vr + data[at + 6 :]


def with_deep_sequence(data: bytes, levels: int) -> bytes:
    """ContentSequence (0040,A730) nested ``levels`` deep (undefined lengths), placed in tag order."""
    tag = struct.pack("<HH", 0x0040, 0xA730)
    opening = tag + b"SQ\x00\x00" + struct.pack("<L", 0xFFFFFFFF) + ITEM
    closing = ITEM_END + SEQUENCE_END
    nested = opening * levels + closing * levels
    at = _first_offset_at_or_after(data, (0x0040, 0xA730))
    return data[:at] + nested + data[at:]


def _first_offset_at_or_after(data: bytes, wanted: tuple[int, int]) -> int:
    """Where an element with tag ``wanted`` belongs in the top-level data set (walks the elements)."""
    start = data.index(b"DICM") + 4
    meta_length = struct.unpack("<L", data[start + 8 : start + 12])[0]
    at = start + 12 + meta_length
    while at < len(data):
        group, element = struct.unpack("<HH", data[at : at + 4])
        if (group, element) >= wanted:
            return at
        vr = data[at + 4 : at + 6]
        if vr in LONG_VRS:
            length = struct.unpack("<L", data[at + 8 : at + 12])[0]
            header = 12
        else:
            length = struct.unpack("<H", data[at + 6 : at + 8])[0]
            header = 8
        if length == 0xFFFFFFFF:  # an undefined-length sequence: skip to its delimiter
            end = data.index(SEQUENCE_END, at)
            at = end + len(SEQUENCE_END)
        else:
            at += header + length
    return len(data)


def _raw(relative: str | bytes) -> bytes:
    return relative if isinstance(relative, bytes) else relative.encode()


def _write(root: Path, relative: str | bytes, data: bytes) -> Path:
    raw = os.fsencode(root) + b"/" + _raw(relative)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as handle:
        handle.write(data)
    return Path(os.fsdecode(raw))


def _write_too_long(root: Path, data: bytes) -> str:
    """A file whose full path exceeds PATH_MAX: made component by component with directory handles."""
    component = "d" * 200
    depth = PATH_MAX // (len(component) + 1) + 1
    parts = [component] * depth
    descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            os.mkdir(part, dir_fd=descriptor)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
        handle = os.open("IM-too-long.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor)
        try:
            os.write(handle, data)
        finally:
            os.close(handle)
    finally:
        os.close(descriptor)
    return "/".join([*parts, "IM-too-long.dcm"])


def _outside_target(outside: Path, name: str, data: bytes) -> Path:
    path = outside / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = path.stat().st_mtime
    os.utime(path, (OLD_ATIME, stamp))
    return path


def build(root: Path, outside: Path, seed: int = 1729, valid: int = 10) -> Corpus:
    """Write the corpus into ``root`` (the watched folder); files that symlinks point at go to ``outside``."""
    rng = random.Random(seed)
    maker = ImageMaker(seed)
    corpus = Corpus(root=root)
    root.mkdir(parents=True, exist_ok=True)

    def fresh() -> bytes:
        return to_bytes(maker.dataset())

    # -- valid files, some in subfolders -----------------------------------------------------
    def place(name: str | bytes, description: str, table: dict[str, str]) -> None:
        data = fresh()
        _write(root, name, data)
        uid = uid_of(data)
        table[uid] = description
        corpus.raw_paths[uid] = _raw(name)

    for number in range(valid):
        folder = "" if number % 2 else f"valid/sub{number % 3}/"
        place(f"{folder}IM{number:04d}.dcm", f"valid file {number}", corpus.valid)

    # -- valid content under hostile names ---------------------------------------------------
    hostile_names: list[tuple[str | bytes, str]] = [
        (b"M\xfcller^Hans/IM1.dcm", "a folder name that is not UTF-8 (Latin-1)"),
        (b"names/IM\xff\xfe.dcm", "a file name that is not UTF-8"),
        ("names/IM\nwith newline.dcm", "a file name with a newline"),
        ("names/IM\twith tab and \u00e9.dcm", "a file name with a tab and non-ASCII UTF-8"),
        ("IM5.dcm/IM0001.dcm", "a folder named like a file"),
        ("names/" + "n" * 250 + ".dcm", "a file name of 254 bytes"),
    ]
    for name, description in hostile_names:
        place(name, description, corpus.valid)
    # a path just under PATH_MAX bytes (counting the watched folder)
    budget = PATH_MAX - len(os.fsencode(root)) - 2 - len("IM-long.dcm") - 1
    long_parts = []
    while budget > 201:
        long_parts.append("l" * 200)
        budget -= 201
    if budget > 1:
        long_parts.append("l" * (budget - 1))
    place("/".join([*long_parts, "IM-long.dcm"]), "a path just under 4096 bytes", corpus.long)
    place("/".join(["k" * 200] * 6 + ["IM-1200.dcm"]), "a path of about 1200 bytes", corpus.long)

    # -- damaged content under plain names ---------------------------------------------------
    base = fresh()
    pixel_at = element_offset(base, PIXEL_DATA)
    name_at = element_offset(base, PATIENT_NAME)
    cuts = {
        "truncated/in-preamble.dcm": 64,
        "truncated/after-dicm.dcm": 132,
        "truncated/in-file-meta.dcm": 150,
        "truncated/in-patient-name.dcm": name_at + 10,
        "truncated/in-pixel-data.dcm": pixel_at + 12 + 100,
        "truncated/last-byte-missing.dcm": len(base) - 1,
    }
    for name, offset in cuts.items():
        data = fresh()  # each its own UIDs: a truncated copy is not a duplicate of a valid file
        _write(root, name, data[:offset])
        corpus.rejected[name] = f"truncated at byte {offset}"
    _write(root, "garbage/random-after-dicm.dcm", b"\x00" * 128 + b"DICM" + rng.randbytes(2000))
    corpus.rejected["garbage/random-after-dicm.dcm"] = "random bytes after the preamble and DICM"
    _write(root, "garbage/random.dcm", rng.randbytes(3000))
    corpus.rejected["garbage/random.dcm"] = "random bytes"
    _write(root, "garbage/empty.dcm", b"")
    corpus.rejected["garbage/empty.dcm"] = "an empty file"
    _write(root, "garbage/huge-name-length.dcm", with_huge_length(fresh(), PATIENT_NAME))
    corpus.rejected["garbage/huge-name-length.dcm"] = "PatientName declaring ~4 GiB"
    _write(root, "garbage/huge-pixel-length.dcm", with_huge_length(fresh(), PIXEL_DATA))
    corpus.rejected["garbage/huge-pixel-length.dcm"] = "PixelData declaring ~4 GiB"
    _write(root, "garbage/unknown-vr.dcm", with_vr(fresh(), PATIENT_NAME, b"ZZ"))
    corpus.rejected["garbage/unknown-vr.dcm"] = "PatientName with the unknown explicit VR ZZ"
    if os.geteuid() != 0:  # root reads anything: the case is moot there
        path = _write(root, "garbage/no-permission.dcm", fresh())
        path.chmod(0)
        corpus.rejected["garbage/no-permission.dcm"] = "a file nobody may read"

    # -- well-formed but odd: may be delivered (de-identified) or refused, never stuck ---------
    deep = fresh()
    corpus.odd_uids[uid_of(deep)] = "odd/deep-sequence.dcm"
    _write(root, "odd/deep-sequence.dcm", with_deep_sequence(deep, 200))
    corpus.odd["odd/deep-sequence.dcm"] = "ContentSequence nested 200 levels deep"
    for name, charset, value, description in (
        ("odd/utf8-invalid.dcm", "ISO_IR 192", b"M\xfcller^J\xc3\x28rg", "ISO_IR 192 with invalid UTF-8"),
        ("odd/iso2022.dcm", "\\ISO 2022 IR 87", b"Yamada^\x1b$B;3ED\x1b(B^\x1b$(Q\xff", "ISO 2022 escapes, one bogus"),
        ("odd/unknown-charset.dcm", "ISO_IR 999", b"Nobody^Known", "an unknown character set"),
    ):
        ds = maker.dataset()
        ds.SpecificCharacterSet = charset
        data = to_bytes(ds)
        at = element_offset(data, PATIENT_NAME)
        old = struct.unpack("<H", data[at + 6 : at + 8])[0]
        padded = value + (b" " if len(value) % 2 else b"")
        data = data[: at + 6] + struct.pack("<H", len(padded)) + padded + data[at + 8 + old :]
        corpus.odd_uids[uid_of(data)] = name
        _write(root, name, data)
        corpus.odd[name] = description
        corpus.odd_values.append(value.split(b"^")[0])

    # -- symlinks ----------------------------------------------------------------------------
    (root / "links").mkdir()
    os.symlink("loop-b", root / "links" / "loop-a")
    os.symlink("loop-a", root / "links" / "loop-b")
    corpus.symlinks["links/loop-a"] = "a symlink loop (a -> b)"
    corpus.symlinks["links/loop-b"] = "a symlink loop (b -> a)"
    os.symlink("/etc/passwd", root / "links" / "passwd.dcm")
    corpus.symlinks["links/passwd.dcm"] = "a symlink to /etc/passwd"
    secret = _outside_target(outside, "secret.txt", b"root:x:0:0:not for Sendit\n")
    os.symlink(secret, root / "links" / "secret.dcm")
    corpus.symlinks["links/secret.dcm"] = "a symlink to a text file outside the folder"
    corpus.never_read.append(secret)
    elsewhere = fresh()
    target = _outside_target(outside, "elsewhere/IM-outside.dcm", elsewhere)
    os.symlink(target, root / "links" / "outside.dcm")
    corpus.symlinks["links/outside.dcm"] = "a symlink to a valid DICOM file outside the folder"
    corpus.outside_uids.add(uid_of(elsewhere))
    corpus.never_read.append(target)
    inner = fresh()
    inner_target = _outside_target(outside, "linked-folder/IM-in-linked-folder.dcm", inner)
    os.symlink(inner_target.parent, root / "links" / "folder")
    corpus.symlinks["links/folder"] = "a symlink to a folder outside holding a valid DICOM file"
    corpus.outside_uids.add(uid_of(inner))
    corpus.never_read.append(inner_target)
    os.symlink(root / "IM0001.dcm", root / "links" / "inside.dcm")
    corpus.symlinks["links/inside.dcm"] = "a symlink to a valid file inside the folder"

    # -- a path longer than PATH_MAX -----------------------------------------------------------
    data = fresh()
    uid = uid_of(data)
    corpus.raw_paths[uid] = _write_too_long(root, data).encode()
    corpus.long[uid] = "a path longer than 4096 bytes"
    return corpus


def accessed_since_written(path: Path) -> bool:
    """True when the file was read after :func:`build` (its access time moved from OLD_ATIME)."""
    return os.stat(path).st_atime > OLD_ATIME + 1


def files_left(root: Path) -> set[bytes]:
    """Paths (inside ``root``, as bytes) of the regular files and symlinks still there; walks by directory
    handle, so paths longer than PATH_MAX are listed too."""
    left: set[bytes] = set()
    base = os.fsencode(root)
    for folder, _dirs, names, _fd in os.fwalk(base):
        relative = os.path.relpath(folder, base)
        for name in names:
            left.add(name if relative == b"." else relative + b"/" + name)
    return left
