"""Each PS3.15 option on real data: what it keeps, what it still removes, and how it is recorded."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from sendit.deid import Deidentifier, DeidOptions
from sendit.deid.metadata import age_bucket
from sendit.deid.scrub import scrub_words
from sendit.identifiers import Identifiers
from tests.test_deid_engine import IDS, assert_vr_valid, make_ct, pydicom_file, write


def run(tmp_path: Path, names: list[str], ds: Dataset | None = None, src: Path | None = None) -> Dataset:
    engine = Deidentifier("k", DeidOptions.from_names(names), pixel_filter=None)
    source = src or write(ds if ds is not None else make_ct(), tmp_path / "in.dcm")
    return pydicom.dcmread(engine.deidentify_file(source, tmp_path / "out.dcm", IDS).path)


def codes(out: Dataset) -> list[str]:
    return [item.CodeValue for item in out.DeidentificationMethodCodeSequence]


def test_retain_patient_characteristics(tmp_path: Path) -> None:
    ds = make_ct()
    ds.PatientAge, ds.PatientWeight, ds.Allergies = "064Y", "71.5", "penicillin (Smith 2019-03-02)"
    out = run(tmp_path, ["retain_patient_characteristics"], ds)
    assert (out.PatientSex, out.PatientAge, out.PatientWeight) == ("F", "064Y", 71.5)
    assert out.Allergies == "penicillin"  # C: cleaned (name and date cut)
    assert "PatientBirthDate" in out and out.PatientBirthDate == ""
    assert codes(out) == ["113100", "113108"] and "LongitudinalTemporalInformationModified" in out
    assert out.LongitudinalTemporalInformationModified == "REMOVED"  # the dates option was not named


def test_retain_device_and_institution_identity(tmp_path: Path) -> None:
    out = run(tmp_path, ["retain_device_identity", "retain_institution_identity", "retain_long_modified_dates"])
    assert (out.StationName, out.DeviceSerialNumber) == ("CT01", "SN12345")
    assert (out.InstitutionName, out.InstitutionAddress) == ("General Hospital", "1 Main Street")
    assert out.InstitutionCodeSequence[0].CodeMeaning == "General Hospital"
    assert out.OperatorsName == "ANONYMIZED" and "OtherPatientIDs" not in out
    assert codes(out) == ["113100", "113109", "113112", "113107"]


def test_retain_uids(tmp_path: Path) -> None:
    original = make_ct()
    out = run(tmp_path, ["retain_uids", "retain_long_modified_dates"], original)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert out[keyword].value == original[keyword].value
    assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.9.7777.1.1.999"
    assert codes(out) == ["113100", "113110", "113107"]
    assert Deidentifier("k", DeidOptions(retain_uids=True)).remap_uid("1.2.3") == "1.2.3"


def test_retain_full_dates(tmp_path: Path) -> None:
    out = run(tmp_path, ["retain_long_full_dates"])
    assert (out.StudyDate, out.InstanceCreationDate, out.StudyTime) == ("20240115", "20240115", "083000")
    assert out.AcquisitionDateTime == "20240115083000.123456+0100"
    assert out.ReferencedImageSequence[0].StudyDate == "20231231"
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert codes(out) == ["113100", "113106"]


def test_without_a_dates_option_dates_go(tmp_path: Path) -> None:
    out = run(tmp_path, [])
    assert out.StudyDate == "" and "AcquisitionDateTime" in out and out.AcquisitionDateTime == "19000101000000"
    assert out.LongitudinalTemporalInformationModified == "REMOVED" and codes(out) == ["113100"]


def test_retain_safe_private(tmp_path: Path) -> None:
    ds = make_ct()
    ge = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    ge.add_new(0x23, "DS", "39.375")  # Table Speed: safe
    ge.add_new(0x10, "LO", "Smith^Alice")  # not listed: goes
    philips = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    philips.add_new(0x0E, "FL", 2.5)  # Scale Slope: safe
    unsafe = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    unsafe.add_new(0x10, "LO", "MRN0012345")  # the block keeps nothing: its creator goes too
    out = run(tmp_path, ["retain_safe_private", "retain_long_modified_dates"], ds)
    private = {elem.tag: elem.value for elem in out if elem.tag.is_private}
    assert private[0x00191023] == "39.375" and private[0x00190010] == "GEMS_ACQU_01"
    assert private[0x20051000 | 0x0E] == pytest.approx(2.5)
    assert 0x00191010 not in private and 0x00430010 not in private and 0x00431010 not in private
    assert 0x00090010 not in private  # ACME 1.0 (make_ct's block) is not known
    assert codes(out) == ["113100", "113111", "113107"]
    assert b"Smith" not in (tmp_path / "out.dcm").read_bytes()


def test_clean_descriptors(tmp_path: Path) -> None:
    ds = make_ct()
    ds.StudyDescription = "CT CHEST for Smith, Alice MRN0012345 on 2024-01-15 at 10:32"
    ds.SeriesDescription = "AX 5MM Doe"  # the referring physician's name is known for this image
    ds.ImageComments = "General Hospital follow-up"  # the institution's words are known too
    ds.DeviceSettingDescription = b"\x01\x02"  # OB: cannot be cleaned, so the profile's action
    out = run(tmp_path, ["clean_descriptors", "retain_long_modified_dates"], ds)
    assert out.StudyDescription == "CT CHEST for on at"
    assert out.SeriesDescription == "AX 5MM"
    assert out.ImageComments == "follow up"
    assert "DeviceSettingDescription" not in out
    assert codes(out) == ["113100", "113107", "113105"]  # in the standard's order of options
    assert_vr_valid(out)


def test_clean_structured_content_on_a_real_sr(tmp_path: Path) -> None:
    original = pydicom.dcmread(pydicom_file("test-SR.dcm"))
    out = run(tmp_path, ["clean_structured_content", "retain_long_modified_dates"], src=pydicom_file("test-SR.dcm"))
    assert len(out.ContentSequence) == len(original.ContentSequence)  # D would leave one empty item

    def items(seq: Sequence) -> list[Dataset]:
        found = []
        for item in seq:
            found.append(item)
            if "ContentSequence" in item:
                found += items(item.ContentSequence)
        return found

    texts = [item.TextValue for item in items(out.ContentSequence) if "TextValue" in item]
    assert "A mass of" in texts and "was detected" in texts  # text kept after cleaning
    for item in items(out.ContentSequence):
        for concept in item.get("ConceptNameCodeSequence", []):
            assert concept.CodeValue  # codes are kept as they are
    data = (tmp_path / "out.dcm").read_bytes()
    assert b"Riesmeier" not in data and b"Test^S R" not in data
    assert codes(out) == ["113100", "113107", "113104"]


def test_clean_graphics(tmp_path: Path) -> None:
    ds = make_ct()
    text = Dataset()
    text.UnformattedTextValue = "Smith^Alice 19600101 lesion 2"
    text.AnchorPointAnnotationUnits = "PIXEL"
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER1"
    annotation.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    out = run(tmp_path, ["clean_graphics", "retain_long_modified_dates"], ds)
    assert out.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "lesion 2"
    assert "OverlayData" not in out and 0x60003000 not in out  # bitmaps cannot be cleaned: still removed
    assert codes(out) == ["113100", "113107", "113103"]


def test_clean_text_and_age_buckets() -> None:
    known = {"smith", "alice", "mrn0012345"}
    assert scrub_words("Smith^Alice: T1 3D brain (Jan 5 2021) tel 555-1234 x@y.org", known) == "T1 3D brain tel"
    assert [age_bucket(a) for a in (0, 4, 5, 47, 89, 90, 104)] == ["0-4", "0-4", "5-9", "45-49", "85-89", "90+", "90+"]


def test_dates_option_with_zero_jitter_claims_full_dates(tmp_path: Path) -> None:
    engine = Deidentifier("k", pixel_filter=None)
    ids = Identifiers("S", "S", "A", jitter_days=0)
    out = pydicom.dcmread(engine.deidentify_file(write(make_ct(), tmp_path / "a.dcm"), tmp_path / "o.dcm", ids).path)
    assert codes(out) == ["113100", "113106"] and out.LongitudinalTemporalInformationModified == "UNMODIFIED"
