"""Reading DICOM files (sendit.dicomio): one clear, PHI-free reason per bad file, and whether it was cut short."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from sendit.deid import Deidentifier, DeidError
from sendit.demo import generate_demo
from sendit.dicomio import FileHeader, RejectedFile, UnreadableFile, read_dicom, read_header
from sendit.identifiers import Identifiers


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return generate_demo(tmp_path / "in", patients=1, images_per_series=1, size=32)[0]


def test_good_file_gives_grouping_values(sample: Path) -> None:
    header = read_header(sample)
    ds = pydicom.dcmread(sample)
    assert isinstance(header, FileHeader)
    assert header.series.series_uid == ds.SeriesInstanceUID and header.sop_instance_uid == ds.SOPInstanceUID
    assert header.series.patient_id == ds.PatientID and header.size == sample.stat().st_size


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"", "empty file"),
        (lambda data: b"plain text, not an image" * 20, "not a DICOM file"),
        (lambda data: data[:-700], "truncated DICOM file"),
        (lambda data: data[:200], "truncated DICOM file: no data elements; (0008,0018) SOPInstanceUID, "),
    ],
)
def test_bad_files_get_a_reason(sample: Path, tmp_path: Path, damage: object, reason: str) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(damage(sample.read_bytes()))  # type: ignore[operator]
    result = read_header(bad)
    assert isinstance(result, RejectedFile) and reason in result.reason


def test_missing_uids_are_named(sample: Path, tmp_path: Path) -> None:
    """One wording for ingest, `sendit deid` (both read_header) and the engine itself."""
    ds = pydicom.dcmread(sample)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    result = read_header(tmp_path / "nouid.dcm")
    assert isinstance(result, RejectedFile) and result.reason == "(0020,000E) SeriesInstanceUID is missing"
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    result = read_header(tmp_path / "nouid.dcm")
    assert isinstance(result, RejectedFile)
    assert result.reason == "(0008,0018) SOPInstanceUID, (0020,000E) SeriesInstanceUID are missing"
    ds.SeriesInstanceUID = "1.2.3"
    ds.save_as(tmp_path / "nouid.dcm")
    result = read_header(tmp_path / "nouid.dcm")
    assert isinstance(result, RejectedFile) and result.reason == "(0008,0018) SOPInstanceUID is missing"
    with pytest.raises(DeidError) as info:
        Deidentifier("key").deidentify_file(tmp_path / "nouid.dcm", tmp_path / "out.dcm", Identifiers("P", "P", "A", 0))
    assert info.value.reason == result.reason
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_a_complete_file_without_pixel_data_is_not_called_truncated(tmp_path: Path, name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / name)
    result = read_header(tmp_path / name)
    assert isinstance(result, RejectedFile) and result.reason == "(0008,0018) SOPInstanceUID is missing"


def test_an_image_cut_inside_its_header_is_called_truncated(sample: Path, tmp_path: Path) -> None:
    data = sample.read_bytes()
    ds = pydicom.dcmread(sample)
    series_uid = ds.SeriesInstanceUID.encode()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.index(series_uid) - 8])  # just before the Series Instance UID element
    result = read_header(cut)
    assert isinstance(result, RejectedFile)
    assert result.reason.startswith("truncated DICOM file: ") and "SeriesInstanceUID" in result.reason


def test_bad_values_do_not_leak_into_logs_or_warnings(
    sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    ds = pydicom.dcmread(sample)
    ds.PatientBirthDate = "SECRETDATE"
    ds.save_as(tmp_path / "odd.dcm")
    caplog.clear()
    recwarn.clear()
    with caplog.at_level(logging.DEBUG):
        result = read_header(tmp_path / "odd.dcm")
    assert isinstance(result, FileHeader)
    assert "SECRETDATE" not in caplog.text
    assert not [w for w in recwarn if "SECRETDATE" in str(w.message)]


def test_overlong_uid_is_rejected(sample: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample)
    ds.SOPInstanceUID = "1." + "2" * 70
    ds.save_as(tmp_path / "long.dcm")
    result = read_header(tmp_path / "long.dcm")
    assert isinstance(result, RejectedFile) and "longer than 64" in result.reason


def test_a_whole_read_says_whether_the_file_was_cut_short(sample: Path, tmp_path: Path) -> None:
    """One reader decides whether a file is whole; its error says so, and the engine passes it on."""
    assert read_dicom(sample).SOPInstanceUID == pydicom.dcmread(sample).SOPInstanceUID
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(sample.read_bytes()[:-700])
    with pytest.raises(UnreadableFile) as info:
        read_dicom(cut)
    assert info.value.truncated and info.value.reason.startswith("truncated DICOM file: ")
    assert isinstance(read_dicom(cut, headers_only=True), pydicom.Dataset)  # the header alone is whole
    text = tmp_path / "notes.txt"
    text.write_text("Smith^Alice " * 20)
    with pytest.raises(UnreadableFile) as info:
        read_dicom(text)
    assert not info.value.truncated and info.value.reason == "not a DICOM file"
    with pytest.raises(DeidError) as wrapped:
        Deidentifier("key").deidentify_file(cut, tmp_path / "out.dcm", Identifiers("P", "P", "A", 0))
    assert wrapped.value.reason.startswith("truncated DICOM file: ")


def test_one_read_gives_the_parse_and_the_hash_of_exactly_those_bytes(sample: Path, tmp_path: Path) -> None:
    """The relay reads each original once for both: the digest is the whole file's and the data set
    is the one a plain read gives."""
    import hashlib

    from sendit.dicomio.reading import read_dicom_digest

    ds, digest = read_dicom_digest(sample)
    assert digest == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert ds == read_dicom(sample)
    with pytest.raises(FileNotFoundError):  # the relay tells a vanished original from a bad one
        read_dicom_digest(tmp_path / "gone.dcm")


def test_the_digest_covers_bytes_a_reader_skipped_by_seeking(tmp_path: Path) -> None:
    import hashlib
    import io

    from sendit.dicomio.reading import DigestingReader

    data = bytes(range(256)) * 4096
    reader = DigestingReader(io.BytesIO(data))
    reader.read(10)
    reader.seek(300_000)  # skips ahead, as a reader may over a value it does not need
    reader.read(5)
    reader.seek(2)  # and back
    reader.read(100)
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()
    assert reader.tell() == 102  # finishing the digest leaves the position where the reader was
