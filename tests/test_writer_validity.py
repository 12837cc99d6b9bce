"""The writer never emits a value a reader could not take back as valid (issue 9, item 6).

A malformed Rows (odd length) used to be copied through byte for byte; Orthanc's parser stalled on
the odd-length file and took the image's whole series down with it. Now such an image is refused
with a :class:`DeidError` naming the tag and the rule (never the value), so the pipeline quarantines
it alone; values the standard lets us repair (odd-length text is padded) are repaired, and what is
written reads back as what the engine meant to write.

Malformed files are made by reading a good file back and putting a ``RawDataElement`` (raw bytes,
as read from a bad file) into it before pydicom writes it again: pydicom copies raw values of a data
set written as it was read untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

from sendit.deid import Deidentifier, DeidError
from sendit.deid.writer import write_part10
from sendit.dicomio import read_dicom
from sendit.identifiers import Identifiers
from tests.test_deid_engine import IDS, KEY, make_ct, write

#: 0x3039 = 12345: the tests check that neither the number nor the bytes reach a message.
MARKER = b"\x39\x30"
MARKER_TEXTS = ("12345", "3930", "\\x39")


@pytest.fixture
def engine() -> Deidentifier:
    return Deidentifier(KEY, pixel_filter=None)


def raw(tag: int, vr: str | None, value: bytes, *, implicit: bool = False, little: bool = True) -> RawDataElement:
    """An element as pydicom reads it from a file, with exactly these value bytes."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)


def with_raw(
    ds: Dataset, tag: int, vr: str | None, value: bytes, *, implicit: bool = False, little: bool = True
) -> Dataset:
    ds[tag] = raw(tag, vr, value, implicit=implicit, little=little)
    return ds


def malformed(ds: Dataset, path: Path, patch: Callable[[Dataset], object], *, syntax: str | None = None) -> Path:
    """``ds`` written to ``path``, read back, changed by ``patch`` (raw elements) and written again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    patch(again)
    again.save_as(path, enforce_file_format=True)
    return path


def refused(engine: Deidentifier, src: Path, tmp_path: Path) -> str:
    """The DeidError message for ``src``; also checks nothing was left in the output folder."""
    out = tmp_path / "out"
    with pytest.raises(DeidError) as info:
        engine.deidentify_file(src, out / "image.dcm", IDS)
    assert not out.exists() or not any(out.iterdir())
    message = info.value.reason
    for text in MARKER_TEXTS:
        assert text not in message, message
    return message


def raw_elements(path: Path) -> Iterator[tuple[int, RawDataElement]]:
    """Every element of a written file as stored (length and bytes), nested ones included."""
    ds = pydicom.dcmread(path)

    def walk(item: Dataset) -> Iterator[tuple[int, RawDataElement]]:
        for tag in list(item.keys()):
            elem = item.get_item(tag)
            if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
                yield int(tag), elem
            if item[tag].VR == "SQ":
                for sub in item[tag].value:
                    yield from walk(sub)

    yield from walk(ds)


# -- malformed binary values: the image is refused, named by tag, never by value ----------------


@pytest.mark.parametrize(
    ("tag", "vr", "value", "named", "rule"),
    [
        (0x00280010, "US", MARKER + b"\x00", "(0028,0010) Rows", "value length 3 is not a multiple of 2"),
        (0x00280010, "US", MARKER[:1], "(0028,0010) Rows", "value length 1 is not a multiple of 2"),
        (0x00280011, "US", MARKER * 2, "(0028,0011) Columns", "2 values where one is allowed"),
        (0x00280010, "UL", MARKER * 2, "(0028,0010) Rows", "VR UL where US is required"),
        (0x0018106E, "UL", MARKER * 3, "(0018,106E) TriggerSamplePosition", "not a multiple of 4"),
        (0x00181320, "FL", MARKER * 3, "(0018,1320) B1rms", "not a multiple of 4"),
        (0x00280009, "AT", MARKER * 3, "(0028,0009) FrameIncrementPointer", "not a multiple of 4"),
        (0x001811B9, "FD", MARKER * 2, "(0018,11B9) XAAcquisitionFrameRate", "not a multiple of 8"),
        (0x00189219, "SS", MARKER + b"\x00", "(0018,9219) TagAngleSecondAxis", "not a multiple of 2"),
    ],
    ids=["US-3", "US-1", "US-two-values", "Rows-as-UL", "UL-6", "FL-6", "AT-6", "FD-4", "SS-3"],
)
def test_malformed_binary_value_is_refused_naming_the_tag(
    engine: Deidentifier, tmp_path: Path, tag: int, vr: str, value: bytes, named: str, rule: str
) -> None:
    src = malformed(make_ct(), tmp_path / "in" / "bad.dcm", lambda ds: with_raw(ds, tag, vr, value))

    message = refused(engine, src, tmp_path)

    assert message.startswith(named)
    assert rule in message


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian], ids=["implicit", "big-endian"])
def test_malformed_rows_in_other_encodings_is_refused(engine: Deidentifier, tmp_path: Path, syntax: str) -> None:
    """Implicit VR: raw elements carry no VR (the dictionary's is used); big endian: not copied raw,
    written by pydicom after the same checks."""
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian

    def patch(ds: Dataset) -> None:
        with_raw(ds, 0x00280010, None if implicit else "US", MARKER + b"\x00", implicit=implicit, little=little)

    src = malformed(make_ct(), tmp_path / "in" / "other.dcm", patch, syntax=syntax)

    message = refused(engine, src, tmp_path)

    assert message.startswith("(0028,0010) Rows: value length 3 is not a multiple of 2")


def test_odd_length_text_is_padded_in_big_endian_too(engine: Deidentifier, tmp_path: Path) -> None:
    def patch(ds: Dataset) -> None:
        with_raw(ds, 0x00080070, "LO", b"ACMEX", little=False)

    src = malformed(make_ct(), tmp_path / "in" / "be.dcm", patch, syntax=ExplicitVRBigEndian)

    out = engine.deidentify_file(src, tmp_path / "out" / "be.dcm", IDS).path

    stored = dict(raw_elements(out))[0x00080070]
    assert (stored.length, pydicom.dcmread(out).Manufacturer) == (6, "ACMEX")


def test_malformed_value_inside_a_kept_sequence_names_its_path(engine: Deidentifier, tmp_path: Path) -> None:
    def patch(ds: Dataset) -> None:
        with_raw(ds.ReferencedImageSequence[0], 0x00280010, "US", MARKER + b"\x00")

    src = malformed(make_ct(), tmp_path / "in" / "nested.dcm", patch)

    message = refused(engine, src, tmp_path)

    assert message.startswith("(0008,1140) ReferencedImageSequence > item 0 > (0028,0010) Rows: ")
    assert "not a multiple of 2" in message


def test_a_well_formed_image_is_still_written(engine: Deidentifier, tmp_path: Path) -> None:
    src = write(make_ct(), tmp_path / "in" / "good.dcm")
    out = engine.deidentify_file(src, tmp_path / "out" / "good.dcm", IDS).path
    assert pydicom.dcmread(out).Rows == 16


# -- what the standard lets us repair is repaired, and reads back as meant -------------------------


def test_odd_length_text_is_padded_and_reads_back(engine: Deidentifier, tmp_path: Path) -> None:
    def patch(ds: Dataset) -> None:
        with_raw(ds, 0x00080070, "LO", b"ACMEX")  # Manufacturer: kept as is
        with_raw(ds, 0x00081090, "LO", b"MODEL")  # Manufacturer Model Name: kept as is
        with_raw(ds.ReferencedImageSequence[0], 0x00080060, "CS", b"CTX")  # inside a kept sequence

    src = malformed(make_ct(), tmp_path / "in" / "odd.dcm", patch)

    out = engine.deidentify_file(src, tmp_path / "out" / "odd.dcm", IDS).path

    odd = [f"{tag:08X}" for tag, elem in raw_elements(out) if elem.length % 2]
    assert odd == []
    back = pydicom.dcmread(out)
    assert (back.Manufacturer, back.ManufacturerModelName) == ("ACMEX", "MODEL")
    assert back.ReferencedImageSequence[0].Modality == "CTX"


def test_every_written_element_has_a_valid_length(engine: Deidentifier, tmp_path: Path) -> None:
    src = write(make_ct(), tmp_path / "in" / "ct.dcm")
    out = engine.deidentify_file(src, tmp_path / "out" / "ct.dcm", IDS).path
    sizes = {"US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "OF": 4, "OL": 4, "FD": 8, "OD": 8}
    for tag, elem in raw_elements(out):
        assert elem.length % sizes.get(str(elem.VR), 2) == 0, f"{tag:08X}"


def test_a_vr_no_reader_knows_is_written_as_the_dictionary_vr(engine: Deidentifier, tmp_path: Path) -> None:
    src = malformed(make_ct(), tmp_path / "in" / "zz.dcm", lambda ds: with_raw(ds, 0x00080070, "ZZ", b"ACME"))

    out = engine.deidentify_file(src, tmp_path / "out" / "zz.dcm", IDS).path

    stored = dict(raw_elements(out))[0x00080070]
    assert (stored.VR, stored.value) == ("LO", b"ACME")


def test_written_file_reads_back_as_the_engine_meant(engine: Deidentifier, tmp_path: Path) -> None:
    src = malformed(make_ct(), tmp_path / "in" / "ct.dcm", lambda ds: with_raw(ds, 0x00080070, "LO", b"ACMEX"))
    meant = engine.deidentify(read_dicom(src), IDS)
    out = tmp_path / "out.dcm"

    write_part10(meant, out)

    back = pydicom.dcmread(out)

    def same(a: Dataset, b: Dataset) -> None:
        assert sorted(a.keys()) == sorted(b.keys())
        for elem in a:
            if elem.VR == "SQ":
                assert len(elem.value) == len(b[elem.tag].value)
                for x, y in zip(elem.value, b[elem.tag].value, strict=True):
                    same(x, y)
            else:
                assert elem.value == b[elem.tag].value, f"{elem.tag}"

    same(meant, back)


def test_a_replacement_the_character_set_cannot_hold_is_refused(engine: Deidentifier, tmp_path: Path) -> None:
    """ISO_IR 100 (Latin-1) cannot hold 山田: pydicom would silently write '??^??'."""
    src = write(make_ct(), tmp_path / "in" / "ct.dcm")
    ids = Identifiers(patient_id="SIDPSEUDO1", patient_name="山田^太郎", accession_number="ACC1", jitter_days=0)

    with pytest.raises(DeidError) as info:
        engine.deidentify_file(src, tmp_path / "out" / "ct.dcm", ids)

    assert info.value.reason.startswith("(0010,0010) PatientName: ")
    assert "character set" in info.value.reason
    assert "山" not in info.value.reason


def test_a_replacement_the_character_set_holds_is_written(engine: Deidentifier, tmp_path: Path) -> None:
    src = write(make_ct(), tmp_path / "in" / "ct.dcm")
    ids = Identifiers(patient_id="SIDPSEUDO1", patient_name="Müller^Jörg", accession_number="ACC1", jitter_days=0)

    out = engine.deidentify_file(src, tmp_path / "out" / "ct.dcm", ids).path

    assert str(pydicom.dcmread(out).PatientName) == "Müller^Jörg"
