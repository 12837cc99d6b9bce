"""The de-identification engine on real DICOM: what every Annex E action does, UIDs, dates, failures.

Builders here (``make_ct``, ``write``) are reused by the canary and folder tests.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.config import RAISE
from pydicom.data import get_testdata_file
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pydicom.valuerep import MAX_VALUE_LEN, validate_value

from sendit.deid import Deidentifier, DeidError, DeidOptions
from sendit.deid import engine as engine_module
from sendit.deid.dates import DATE_OF_TIME, shift_da, shift_dt, shift_tm
from sendit.deid.profile import (
    Action,
    Unlisted,
    build_action_table,
    classify_unlisted,
    load_rows,
    resolve,
    unlisted_attributes,
)
from sendit.deid.writer import write_part10
from sendit.dicomio import read_dicom
from sendit.identifiers import Identifiers

KEY = "test-secret-key"
IDS = Identifiers(
    patient_id="SIDPSEUDO1",
    patient_name="SIDPSEUDO1",
    accession_number="ACCPSEUDO1",
    jitter_days=-45,
    jitter_seconds=40_000,
)
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
MAX_LEN = {**MAX_VALUE_LEN, "AS": 4}  # pydicom's table, and AS (always 4 characters)


# -- builders ---------------------------------------------------------------------------------------


def make_ct(
    *,
    study_uid: str = "1.2.826.0.1.3680043.9.7777.1",
    series_uid: str = "1.2.826.0.1.3680043.9.7777.1.1",
    sop_uid: str | None = None,
    patient_id: str = "MRN0012345",
    patient_name: str = "Smith^Alice",
    referenced_sop: str = "1.2.826.0.1.3680043.9.7777.1.1.999",
    rows: int = 16,
) -> Dataset:
    """A CT with pixels, file meta, nested and private sequences, overlays and curves."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240115"
    ds.InstanceCreationTime = "101010"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyDate = "20240115"
    ds.SeriesDate = "20240115"
    ds.AcquisitionDateTime = "20240115083000.123456+0100"
    ds.StudyTime = "083000"
    ds.AccessionNumber = "ACC998877"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "1 Main Street"
    ds.ReferringPhysicianName = "Doe^John"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST"
    ds.OperatorsName = "Tech^Terry"
    code = Dataset()
    code.CodeValue = "GH1"
    code.CodingSchemeDesignator = "99LOCAL"
    code.CodeMeaning = "General Hospital"
    ds.InstitutionCodeSequence = Sequence([code])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = referenced_sop
    ref.StudyDate = "20231231"  # a date inside a kept sequence is shifted too
    nested_block = ref.private_block(0x0011, "ACME NESTED", create=True)
    nested_block.add_new(0x01, "LO", "Smith^Alice nested")
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = "RP1"
    req.AccessionNumber = "ACC998877"
    ds.RequestAttributesSequence = Sequence([req])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.OtherPatientIDs = "OTHER123"
    ds.SliceThickness = "1.0"
    ds.DeviceSerialNumber = "SN12345"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "S1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = study_uid + ".0"
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "Smith^Alice private")
    inner = Dataset()
    inner.PatientName = "Smith^Alice in private sequence"
    block.add_new(0x11, "SQ", Sequence([inner]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", rows)
    ds.add_new(0x60000022, "LO", "overlay about Smith")
    ds.add_new(0x60003000, "OW", b"\x01\x00" * (rows * rows // 16))
    ds.add_new(0x60004000, "LT", "overlay comment Smith")
    ds.add_new(0x50003000, "OW", b"\x02\x00" * 8)
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "HOSPITAL_AE"
    ds.file_meta = meta
    return ds


def pydicom_file(name: str) -> Path:
    """One of pydicom's bundled test files (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return Path(path)


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def elements(ds: Dataset) -> Iterator[pydicom.DataElement]:
    """Every element, in every nested sequence."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from elements(item)


def assert_vr_valid(ds: Dataset) -> None:
    """Every element's value is valid for its VR (pydicom's validators plus real calendar dates)."""
    for elem in elements(ds):
        if elem.VR == "SQ" or elem.tag.is_private or elem.is_empty:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            validate_value(elem.VR, str(value) if elem.VR in TEXT_VRS else value, RAISE)
            if elem.VR in MAX_LEN and isinstance(value, str):
                assert len(value) <= MAX_LEN[elem.VR], elem.tag
            if elem.VR == "UI":
                assert UID_RE.match(str(value)), elem.tag
            if elem.VR == "DA":
                assert shift_da(str(value), 0) == str(value)
            if elem.VR == "DT":
                assert shift_dt(str(value), 0) == str(value)


@pytest.fixture
def engine() -> Deidentifier:
    """The header engine alone: the burned-in text filter has its own tests (test_deid_pixels)."""
    return Deidentifier(KEY, pixel_filter=None)


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    return write(make_ct(), tmp_path / "in" / "ct.dcm")


def deid(engine: Deidentifier, src: Path, tmp_path: Path, ids: Identifiers = IDS) -> Dataset:
    result = engine.deidentify_file(src, tmp_path / "out" / f"{src.stem}.dcm", ids)
    return pydicom.dcmread(result.path)


# -- the action table --------------------------------------------------------------------------------


def test_table_is_built_from_the_shipped_standard_data() -> None:
    rows = load_rows()
    assert len(rows) == 621
    table = build_action_table(DeidOptions().columns())
    assert table.exact[0x00100010] is Action.EMPTY  # Patient's Name: Z
    assert table.exact[0x00080080] is Action.DUMMY  # Institution Name: X/Z/D
    assert table.exact[0x00081140] is Action.WALK  # Referenced Image Sequence: X/Z/U*
    assert table.exact[0x00200010] is Action.EMPTY  # Study ID: Z
    assert table.exact[0x00100030] is Action.EMPTY  # Birth Date: Z, not covered by the dates option
    assert table.exact[0x00080022] is Action.SHIFT_DATE  # Acquisition Date: X/Z, option C
    assert table.exact[0x00080032] is Action.SHIFT_DATE  # Acquisition Time: X/Z, option C: shifted with its date
    assert table.exact[0x0020000D] is Action.REMAP_UID
    assert table.removed_groups == {0x50, 0x60}
    assert table.private is Action.REMOVE
    # The Basic Profile column itself never says K or C: those come only from options.
    assert not {code for row in rows for code in row.basic.split("/")} & {"K", "C"}


def test_without_the_dates_option_dates_get_the_basic_profile_action() -> None:
    table = build_action_table(DeidOptions(retain_long_modified_dates=False).columns())
    assert table.exact[0x00080022] is Action.EMPTY  # X/Z → Z
    assert table.exact[0x00080012] is Action.DUMMY  # X/D → D
    assert table.exact[0x00080020] is Action.EMPTY  # Study Date: Z


@pytest.mark.parametrize(
    ("code", "vr", "action"),
    [
        ("X/Z", "LO", Action.EMPTY),
        ("X/D", "LO", Action.DUMMY),
        ("Z/D", "PN", Action.DUMMY),
        ("X/Z/D", "SQ", Action.DUMMY),
        ("X/Z/U*", "SQ", Action.WALK),
        ("X/Z/U*", "LO", Action.EMPTY),
        ("X", "LO", Action.REMOVE),
        ("U", "UI", Action.REMAP_UID),
    ],
)
def test_combined_codes_resolve_to_the_least_destructive_valid_action(code: str, vr: str, action: Action) -> None:
    assert resolve(code, vr) is action


# -- attributes the table does not list ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("vr", "keyword", "kind"),
    [
        ("PN", "EvaluatorName", Unlisted.PERSON_NAME),
        ("LT", "DetectorDescription", Unlisted.FREE_TEXT),
        ("LT", "CommentsOnTheScheduledProcedureStep", Unlisted.FREE_TEXT),
        ("LT", "GridAbsorbingMaterial", Unlisted.TECHNICAL_TEXT),
        ("LO", "CodeMeaning", Unlisted.CODED),
        ("SH", "CodingSchemeDesignator", Unlisted.CODED),
        ("LO", "Manufacturer", Unlisted.TECHNICAL),
        ("LO", "ManufacturerModelName", Unlisted.TECHNICAL),
        ("LO", "SoftwareVersions", Unlisted.TECHNICAL),
        ("SH", "ConvolutionKernel", Unlisted.TECHNICAL),
        ("SH", "SequenceName", Unlisted.TECHNICAL),
        ("LO", "MIMETypeOfEncapsulatedDocument", Unlisted.TECHNICAL),
        ("LO", "DimensionIndexPrivateCreator", Unlisted.TECHNICAL),
        ("LO", "WindowCenterWidthExplanation", Unlisted.FREE_TEXT),
        ("LO", "DoseComment", Unlisted.FREE_TEXT),
        ("LO", "PatientBirthDateInAlternativeCalendar", Unlisted.IDENTITY),
        ("LO", "ContactDisplayName", Unlisted.IDENTITY),
        ("LO", "HangingProtocolCreator", Unlisted.IDENTITY),
        ("SH", "RouteID", Unlisted.IDENTITY),  # DICOS travel, unlike ContrastBolusRoute
        ("LO", "ContrastBolusRoute", Unlisted.TECHNICAL),
        ("UR", "RetrieveURL", Unlisted.UNCLASSIFIED),  # a host name and the original study UID
        ("CS", "ScanOptions", None),  # coded by definition: the rule leaves it alone
        ("DS", "SliceThickness", None),
    ],
)
def test_unlisted_attributes_are_classed_from_their_vr_and_keyword(
    vr: str, keyword: str, kind: Unlisted | None
) -> None:
    assert classify_unlisted(vr, keyword) is kind


def test_the_rule_for_unlisted_attributes_covers_the_dictionary() -> None:
    found = unlisted_attributes()
    assert 0x00142006 in found and 0x00400400 in found and 0x00187006 in found  # the MR's planted three
    assert not set(found) & {row.value for row in load_rows() if row.is_exact}
    table = build_action_table(DeidOptions().columns())
    assert table.exact[0x00142006] is Action.UNLISTED and table.unlisted[0x00142006] is Action.EMPTY
    assert table.unlisted[0x00283003] is Action.DUMMY  # LUT Explanation: Type 1 in a module of PS3.3
    assert table.unlisted[0x00187040] is Action.CLEAN  # Grid Absorbing Material: technical text
    assert 0x00080070 not in table.exact  # Manufacturer: kept
    cleaning = build_action_table(DeidOptions(clean_descriptors=True).columns())
    assert cleaning.unlisted[0x00187006] is Action.CLEAN  # Detector Description: cleaned like a description
    assert cleaning.unlisted[0x00142006] is Action.EMPTY  # a name is never cleaned into the output


def test_the_unlisted_counts_are_the_documented_ones() -> None:
    """The figures docs/deidentification.md gives ("Attributes the table does not list")."""
    per_class: Counter[tuple[str, bool]] = Counter()
    for tag, kind in unlisted_attributes().items():
        per_class[(kind.value, bool(DicomDictionary[tag][3]))] += 1
    assert per_class == {
        ("person name", False): 2,
        ("person name", True): 1,
        ("free text", False): 162,
        ("free text", True): 16,
        ("technical text", False): 4,
        ("identity", False): 24,
        ("unclassified", False): 14,
        ("unclassified", True): 10,
        ("coded", False): 10,
        ("technical", False): 208,
        ("technical", True): 20,
    }
    table = build_action_table(DeidOptions().columns())
    assert Counter(action.value for action in table.unlisted.values()) == {"Z": 190, "D": 39, "C": 4}


def test_unlisted_text_is_removed_in_a_real_mr_at_every_kept_depth(engine: Deidentifier, tmp_path: Path) -> None:
    """The issue's find: a name, a comment and a dated description planted in a real MR were kept."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.add_new(0x00142006, "PN", "Evaluator^Eve")  # Evaluator Name
    ds.add_new(0x00400400, "LT", "call Mrs Smith on 555-0199")  # Comments on the Scheduled Procedure Step
    ds.add_new(0x00187006, "LT", "panel replaced 2023-04-01 by J. Doe")  # Detector Description
    ds.add_new(0x00187040, "LT", "LEAD")  # Grid Absorbing Material: technical text
    ds.add_new(0x00181250, "SH", "HEAD_32CH")  # Receive Coil Name: technical
    lut = Dataset()
    lut.add_new(0x00283002, "US", [2, 0, 16])  # LUT Descriptor
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", [0, 1])  # LUT Data
    lut.LUTExplanation = "drawn for Smith"  # Type 1 in PS3.3: a dummy, not an empty value
    ds.ModalityLUTSequence = Sequence([lut])
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ref.add_new(0x00142006, "PN", "Evaluator^Eve")  # inside a walked reference sequence
    ref.add_new(0x00187006, "LT", "nested note")
    ds.ReferencedImageSequence = Sequence([ref])
    out = deid(engine, write(ds, tmp_path / "mr.dcm"), tmp_path)

    for item in (out, out.ReferencedImageSequence[0]):
        assert item[0x00142006].is_empty and item[0x00187006].is_empty
    assert out[0x00400400].is_empty
    assert (out[0x00187040].value, out.ReceiveCoilName, out.Manufacturer) == ("LEAD", "HEAD_32CH", ds.Manufacturer)
    assert out.ModalityLUTSequence[0].LUTExplanation == "ANONYMIZED"
    assert out.ModalityLUTSequence[0].ModalityLUTType == "HU"
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == engine.remap_uid("1.2.3.4.5")


def test_clean_descriptors_cleans_unlisted_free_text(tmp_path: Path) -> None:
    ds = make_ct()
    ds.add_new(0x00187006, "LT", "flat panel replaced 2023-04-01 for Smith")  # Detector Description
    ds.add_new(0x00142006, "PN", "Evaluator^Eve")
    engine = Deidentifier(KEY, DeidOptions.from_names(["clean_descriptors", "retain_long_modified_dates"]))
    out = deid(engine, write(ds, tmp_path / "ct.dcm"), tmp_path)
    assert out[0x00187006].value == "flat panel replaced for"  # the date and the patient's name cut
    assert out[0x00142006].is_empty


def test_contradictory_options_and_an_empty_key_are_refused() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        DeidOptions(retain_long_full_dates=True)  # modified dates are on by default
    with pytest.raises(ValueError, match="unknown de-identification option 'retain_everything'"):
        DeidOptions.from_names(["retain_uids", "retain_everything"])
    assert DeidOptions.from_names(["Retain-UIDs", " clean_descriptors "]).enabled() == (
        "retain_uids",
        "clean_descriptors",
    )
    with pytest.raises(ValueError):
        Deidentifier("")


# -- every action on real data -----------------------------------------------------------------------


def test_each_action_on_a_real_ct(engine: Deidentifier, ct_file: Path, tmp_path: Path) -> None:
    original = pydicom.dcmread(ct_file)
    out = deid(engine, ct_file, tmp_path)
    # X: removed
    for keyword in ("InstitutionAddress", "OtherPatientIDs", "RequestAttributesSequence", "StudyDescription"):
        assert keyword not in out, keyword
    # Z: present, empty
    for keyword in ("ReferringPhysicianName", "PatientBirthDate", "PatientSex", "StudyID"):
        assert keyword in out and out[keyword].is_empty, keyword
    # D: a dummy valid for the VR; a sequence keeps its items, every value in them a dummy
    assert out.InstitutionName == "ANONYMIZED"
    assert out.StationName == "ANONYMIZED"
    assert out.OperatorsName == "ANONYMIZED"
    assert out.DeviceSerialNumber == "ANONYMIZED"
    (code,) = out.InstitutionCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("ANONYMIZED",) * 3
    # U: remapped everywhere
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert out[keyword].value == engine.remap_uid(original[keyword].value) != original[keyword].value
        assert out[keyword].value.startswith("2.25.")
    # U* (walked sequence): kept, UIDs inside remapped, dates inside shifted, private tags inside gone
    item = out.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == engine.remap_uid("1.2.826.0.1.3680043.9.7777.1.1.999")
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert item.StudyDate == "20231116"
    assert not any(elem.tag.is_private for elem in item)
    # K: untouched (values and pixel bytes)
    for keyword in ("Modality", "Manufacturer", "SliceThickness", "ImageType", "Rows", "SOPClassUID"):
        assert out[keyword].value == original[keyword].value, keyword
    assert out.PixelData == original.PixelData
    # identifiers
    assert (out.PatientID, out.PatientName, out.AccessionNumber) == ("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1")
    assert_vr_valid(out)


def test_private_tags_overlays_and_curves_are_gone_at_every_level(
    engine: Deidentifier, ct_file: Path, tmp_path: Path
) -> None:
    out = deid(engine, ct_file, tmp_path)
    tags = [elem.tag for elem in elements(out)]
    assert tags and not [tag for tag in tags if tag.is_private]
    assert not [tag for tag in tags if tag.group >> 8 in (0x50, 0x60)]


@pytest.mark.parametrize("name", ["nested_priv_SQ.dcm", "priv_SQ.dcm", "examples_overlay.dcm", "rtplan.dcm"])
def test_private_and_overlay_removal_on_pydicom_files(engine: Deidentifier, name: str) -> None:
    ds = pydicom.dcmread(pydicom_file(name))
    engine.deidentify(ds, IDS)
    tags = [elem.tag for elem in elements(ds)]
    assert not [tag for tag in tags if tag.is_private or tag.group >> 8 in (0x50, 0x60)]


def test_deidentification_is_recorded(engine: Deidentifier, ct_file: Path, tmp_path: Path) -> None:
    out = deid(engine, ct_file, tmp_path)
    assert out.PatientIdentityRemoved == "YES"
    method = list(out.DeidentificationMethod)
    assert method[0].startswith("Sendit") and "PS3.15 Basic Profile" in method[0]
    assert "Retain Longitudinal Temporal Information Modified Dates Option" in method
    codes = [(item.CodeValue, item.CodingSchemeDesignator) for item in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM")]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert_vr_valid(out)


def test_a_zero_shift_is_not_claimed_as_modified(engine: Deidentifier, ct_file: Path, tmp_path: Path) -> None:
    ids = Identifiers("SIDX", "SIDX", "ACCX", jitter_days=0)
    out = deid(engine, ct_file, tmp_path, ids)
    assert out.StudyDate == "20240115"
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100", "113106"]


# -- pydicom's own test files: every element valid for its VR, pixels untouched ----------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "rtdose.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle_2frame.dcm",
        "image_dfl.dcm",
        "waveform_ecg.dcm",
        "test-SR.dcm",
        "examples_overlay.dcm",
    ],
)
def test_pydicom_files_deidentify_to_valid_objects(engine: Deidentifier, name: str, tmp_path: Path) -> None:
    src = pydicom_file(name)
    original = pydicom.dcmread(src)
    out = deid(engine, src, tmp_path)
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == engine.remap_uid(original.SOPInstanceUID)
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID == original.SOPClassUID
    if "PixelData" in original:
        assert out.PixelData == original.PixelData
    changed = Dataset()
    for elem in elements(out):
        if elem.VR in ("UI", "DA", "DT", "PN", "LO", "SH", "CS", "AE", "AS"):
            changed.add(elem)
    assert_vr_valid(changed)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "rtplan.dcm", "test-SR.dcm"])
def test_fast_writer_matches_pydicom_byte_for_byte(engine: Deidentifier, name: str, tmp_path: Path) -> None:
    ours = engine.deidentify(read_dicom(pydicom_file(name)), IDS)
    theirs = engine.deidentify(read_dicom(pydicom_file(name)), IDS)
    write_part10(ours, tmp_path / "ours.dcm")
    theirs.preamble = b"\x00" * 128
    theirs.save_as(tmp_path / "theirs.dcm", enforce_file_format=True)
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "theirs.dcm").read_bytes()


def test_preamble_and_file_meta_extras_are_not_copied(engine: Deidentifier, tmp_path: Path) -> None:
    ds = make_ct()
    ds.preamble = b"Smith^Alice MRN0012345".ljust(128, b"\x00")
    out_path = engine.deidentify_file(write(ds, tmp_path / "a.dcm"), tmp_path / "out.dcm", IDS).path
    data = out_path.read_bytes()
    assert data[:128] == b"\x00" * 128 and b"Smith" not in data and b"HOSPITAL_AE" not in data


# -- UIDs ---------------------------------------------------------------------------------------------


def test_uids_are_consistent_across_series_references_and_file_meta(engine: Deidentifier, tmp_path: Path) -> None:
    target_uid = "1.2.826.0.1.3680043.9.7777.1.1.5"
    first = write(make_ct(sop_uid=target_uid), tmp_path / "in" / "a.dcm")
    second = write(
        make_ct(series_uid="1.2.826.0.1.3680043.9.7777.1.2", referenced_sop=target_uid), tmp_path / "in" / "b.dcm"
    )
    a = deid(engine, first, tmp_path)
    b = deid(engine, second, tmp_path)
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    for out in (a, b):
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert out.file_meta.MediaStorageSOPClassUID == CTImageStorage


def test_uid_remap_is_keyed_deterministic_and_valid() -> None:
    uid = "1.2.826.0.1.3680043.9.7777.1"
    one, two, other = Deidentifier(KEY), Deidentifier(KEY.encode()), Deidentifier("another key")
    assert one.remap_uid(uid) == two.remap_uid(uid) == one.remap_uid(uid + "\x00")
    assert one.remap_uid(uid) != other.remap_uid(uid)
    assert one.remap_uid(uid) != one.remap_uid(uid + ".1")
    remapped = one.remap_uid(uid)
    assert remapped.startswith("2.25.") and len(remapped) <= 64 and UID_RE.match(remapped)
    assert uid not in remapped
    for registered in (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2.4.50"):
        assert one.remap_uid(registered) == registered
    assert "test-secret-key" not in repr(one)


def test_a_pickled_engine_remaps_the_same(engine: Deidentifier) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(engine))
    assert clone.remap_uid("1.2.3.4") == engine.remap_uid("1.2.3.4")


# -- dates --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("20240115", -45, "20231201"),  # across a year
        ("20231220", 15, "20240104"),
        ("20240301", -1, "20240229"),  # leap day
        ("20230301", -1, "20230228"),
        ("2024.01.15", -45, "20231201"),  # legacy ACR-NEMA form, written back as DICOM
    ],
)
def test_da_shift(value: str, days: int, expected: str) -> None:
    assert shift_da(value, days) == expected


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("20240101083000.123456+0100", -1, "20231231083000.123456+0100"),  # precision and timezone kept
        ("20240131235959-0500", 1, "20240201235959-0500"),
        ("20240115", -45, "20231201"),
        ("2024011508", 30, "2024021408"),
        ("202403", -45, "202401"),  # reduced precision: shifted from the first of the month
        ("2024", 10, "2024"),
    ],
)
def test_dt_shift(value: str, days: int, expected: str) -> None:
    assert shift_dt(value, days) == expected


@pytest.mark.parametrize(
    ("value", "seconds", "expected", "carried"),
    [
        ("083000", 3600, "093000", 0),
        ("083000.123456", 3 * 3600 + 61, "113101.123456", 0),  # the fraction is kept as written
        ("233000", 3600, "003000", 1),  # round the clock: one day carried into the date
        ("23:30:00", 1800, "000000", 1),  # the ACR-NEMA form, written back as DICOM
        ("0830", 45 * 60 + 59, "0915", 0),  # HHMM stays HHMM
        ("08", 5400, "09", 0),  # HH stays HH
        ("235960", 1, "000001", 1),  # a leap second
    ],
)
def test_tm_shift(value: str, seconds: int, expected: str, carried: int) -> None:
    assert shift_tm(value, seconds) == (expected, carried)


@pytest.mark.parametrize(
    ("value", "days", "seconds", "expected"),
    [
        ("20240115233000.5+0100", -45, 3600, "20231202003000.5+0100"),  # the day carried, the offset kept
        ("2024011508", 1, 5400, "2024011609"),  # hour precision stays hour precision
        ("20240115", -45, 3600, "20231201"),  # no time part: the days only
    ],
)
def test_dt_shift_with_a_time_of_day_offset(value: str, days: int, seconds: int, expected: str) -> None:
    assert shift_dt(value, days, seconds) == expected


@pytest.mark.parametrize("bad", ["256199", "12:61:99", "8:30", "083000,5", "ab"])
def test_a_malformed_time_is_refused(bad: str) -> None:
    with pytest.raises(engine_module.BadValue, match="malformed TM value"):
        shift_tm(bad, 60)


def test_every_time_has_its_date_found_in_the_dictionary() -> None:
    assert DATE_OF_TIME[0x00080030] == 0x00080020  # Study Time → Study Date
    assert DATE_OF_TIME[0x00181201] == 0x00181200  # Time of Last Calibration → Date of Last Calibration
    assert 0x00181072 not in DATE_OF_TIME  # Radiopharmaceutical Start Time: no date of its own


def test_the_local_provider_keys_time_seconds_per_patient() -> None:
    """The same seconds in every study of a patient, other ones for another key or patient."""
    from sendit.identifiers.base import SeriesHeader
    from sendit.identifiers.local import LocalProvider

    def seconds(key: str, patient: str, study: str) -> int:
        header = SeriesHeader(series_uid=f"{study}.1", study_uid=study, patient_id=patient)
        return LocalProvider(key).identify([header])[f"{study}.1"].jitter_seconds

    offset = seconds("k", "MRN1", "1.2.3")
    assert 0 <= offset < 86400 and offset == seconds("k", "MRN1", "1.2.4")
    assert offset != seconds("other key", "MRN1", "1.2.3")
    assert len({seconds("k", f"MRN{n}", "1.2.3") for n in range(20)}) > 15


def test_a_service_that_states_dates_keeps_them_exact_and_times_of_day(engine: Deidentifier) -> None:
    """DASHER's answer gives whole days (jitter_seconds 0): dates are exactly the answer's."""
    ds = make_ct()
    ds.StudyDate, ds.StudyTime = "20240115", "235959"
    engine.deidentify(ds, Identifiers("SIDX", "SIDX", "ACCX", jitter_days=-3))
    assert (ds.StudyDate, ds.StudyTime) == ("20240112", "235959")


def _instant(date: str, time: str) -> datetime.datetime:
    return datetime.datetime.strptime(date + time[:6].ljust(6, "0"), "%Y%m%d%H%M%S")


def test_dates_and_times_everywhere_move_by_one_offset(engine: Deidentifier, tmp_path: Path) -> None:
    """Modified dates: every date and time of the patient moves by the same days and seconds, so no
    original time of day is left and every interval between two instants stays exact."""
    ds = make_ct()
    ds.ContentDate, ds.ContentTime = "20240301", "235959.5"
    ds.SeriesDate, ds.SeriesTime = "20240115", "000001"
    ds.CalibrationDate = ["20240101", "20231231"]  # multi-valued DA, not in the table, no time of its own
    ds.RadiopharmaceuticalStartTime = "071500"  # no date of its own: round the clock
    src = write(ds, tmp_path / "a.dcm")
    for days in (-1, 31):
        seconds = 40_000
        ids = Identifiers("SIDX", "SIDX", "ACCX", days, jitter_seconds=seconds)
        assert seconds  # (a zero offset for this key and patient would make the test prove nothing)
        offset = datetime.timedelta(days=days, seconds=seconds)
        out = deid(engine, src, tmp_path, ids)
        for date, time in (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
            assert _instant(out[date].value, out[time].value) == _instant(ds[date].value, ds[time].value) + offset
        assert out.ContentTime.endswith(".5") and out.StudyTime != ds.StudyTime
        original = datetime.datetime(2024, 1, 15, 8, 30, 0, 123456)
        shifted = datetime.datetime.strptime(out.AcquisitionDateTime[:21], "%Y%m%d%H%M%S.%f")
        assert shifted == original + offset and out.AcquisitionDateTime.endswith("+0100")
        expected_start = (datetime.datetime(2000, 1, 1, 7, 15) + datetime.timedelta(seconds=seconds)).strftime("%H%M%S")
        assert out.RadiopharmaceuticalStartTime == expected_start
        assert list(out.CalibrationDate) == [shift_da(d, days) for d in ds.CalibrationDate]
        assert out.ReferencedImageSequence[0].StudyDate == shift_da("20231231", days)  # in a kept sequence
        assert_vr_valid(out)


def test_a_time_that_comes_before_its_date_still_carries_into_it(engine: Deidentifier) -> None:
    """The walk meets (0014,407C) Calibration Time before (0014,407E) Calibration Date."""
    assert DATE_OF_TIME[0x0014407C] == 0x0014407E
    seconds = IDS.jitter_seconds
    ds = make_ct()
    before_midnight = (datetime.datetime(2000, 1, 1) - datetime.timedelta(seconds=seconds // 2 + 1)).strftime("%H%M%S")
    ds.add_new(0x0014407C, "TM", before_midnight)
    ds.add_new(0x0014407E, "DA", "20240115")
    engine.deidentify(ds, IDS)
    moved = _instant(ds[0x0014407E].value, ds[0x0014407C].value)
    assert moved == _instant("20240115", before_midnight) + datetime.timedelta(days=IDS.jitter_days, seconds=seconds)
    assert ds[0x0014407E].value != shift_da("20240115", IDS.jitter_days)  # the day was carried


def test_times_are_kept_when_the_identifiers_ask_for_real_dates(
    engine: Deidentifier, ct_file: Path, tmp_path: Path
) -> None:
    out = deid(engine, ct_file, tmp_path, Identifiers("SIDX", "SIDX", "ACCX", jitter_days=0))
    assert (out.StudyDate, out.StudyTime, out.InstanceCreationTime) == ("20240115", "083000", "101010")


# -- failing closed -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("bad", ["2021-13-45", "20211345", "2021", "Jan 5 2021"])
def test_a_malformed_date_fails_without_output(engine: Deidentifier, tmp_path: Path, bad: str) -> None:
    ds = make_ct()
    ds.ContentDate = bad
    src = write(ds, tmp_path / "a.dcm")
    dst = tmp_path / "out" / "a.dcm"
    with pytest.raises(DeidError) as info:
        engine.deidentify_file(src, dst, IDS)
    assert "(0008,0023) ContentDate" in info.value.reason
    assert bad not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_a_malformed_date_inside_a_sequence_names_the_path(engine: Deidentifier) -> None:
    ds = make_ct()
    ds.ReferencedImageSequence[0].StudyDate = "notadate"
    with pytest.raises(DeidError, match=r"\(0008,1140\) ReferencedImageSequence > item 0 > \(0008,0020\)"):
        engine.deidentify(ds, IDS)


def test_a_failing_write_leaves_nothing_behind(
    engine: Deidentifier, ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write(ds: Dataset, path: Path) -> None:
        path.write_bytes(b"half a file")
        raise OSError("disk full at /secret/Smith^Alice")

    monkeypatch.setattr(engine_module, "write_part10", half_write)
    dst = tmp_path / "out" / "a.dcm"
    with pytest.raises(DeidError, match="could not write") as info:
        engine.deidentify_file(ct_file, dst, IDS)
    assert "Smith" not in str(info.value)
    assert list(dst.parent.iterdir()) == []


def test_an_internal_failure_is_a_deid_error(
    engine: Deidentifier, ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(uid: str) -> str:
        raise RuntimeError("boom Smith^Alice")

    monkeypatch.setattr(engine, "_remap", broken)
    with pytest.raises(DeidError) as info:
        engine.deidentify_file(ct_file, tmp_path / "out" / "a.dcm", IDS)
    assert "RuntimeError" in info.value.reason and "Smith" not in info.value.reason
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_dicom_and_truncated_files_are_refused(engine: Deidentifier, ct_file: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("Smith^Alice MRN0012345 " * 20)
    with pytest.raises(DeidError, match="not a DICOM file"):
        engine.deidentify_file(text, tmp_path / "out" / "x.dcm", IDS)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(ct_file.read_bytes()[:-100])
    with pytest.raises(DeidError, match="truncated"):
        engine.deidentify_file(cut, tmp_path / "out" / "y.dcm", IDS)
    with pytest.raises(DeidError, match="truncated"):
        engine.deidentify_file(pydicom_file("rtplan_truncated.dcm"), tmp_path / "out" / "z.dcm", IDS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_every_dummy_text_fits_its_vr() -> None:
    for vr, value in engine_module.DUMMY_VALUES.items():
        if isinstance(value, str) and vr in MAX_LEN:
            assert len(value) <= MAX_LEN[vr], vr


def test_invalid_replacement_identifiers_are_refused(engine: Deidentifier, ct_file: Path, tmp_path: Path) -> None:
    for ids in (Identifiers("", "X", "A", 1), Identifiers("P", "X", "A" * 17, 1), Identifiers("P\\Q", "X", "A", 1)):
        with pytest.raises(DeidError, match="replacement"):
            engine.deidentify_file(ct_file, tmp_path / "out" / "a.dcm", ids)


def test_implicit_vr_input_stays_implicit(engine: Deidentifier, tmp_path: Path) -> None:
    ds = make_ct()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    src = tmp_path / "implicit.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = deid(engine, src, tmp_path)
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert out.InstitutionName == "ANONYMIZED" and out.PixelData == ds.PixelData
    assert not [elem for elem in elements(out) if elem.tag.is_private]
    assert_vr_valid(out)


@pytest.mark.parametrize("name", ["ct", "JPEG2000.dcm", "MR_small_bigendian.dcm"])
def test_an_image_cut_anywhere_is_refused(engine: Deidentifier, tmp_path: Path, name: str) -> None:
    src = write(make_ct(), tmp_path / "ct.dcm") if name == "ct" else pydicom_file(name)
    data = src.read_bytes()
    cut = tmp_path / "cut.dcm"
    for end in range(160, len(data) - 1, max(1, len(data) // 80)):
        cut.write_bytes(data[:end])
        with pytest.raises(DeidError):
            engine.deidentify_file(cut, tmp_path / "out" / "cut.dcm", IDS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_implicit_data_in_a_file_labelled_explicit_is_written(tmp_path: Path) -> None:
    """pydicom's SC_rgb_jpeg.dcm says Explicit VR but holds implicit elements (no VR when read raw)."""
    src = Path(get_testdata_file("SC_rgb_jpeg.dcm", download=False))
    engine = Deidentifier(KEY, pixel_filter=None)  # a secondary capture: the default filter would quarantine it
    out = pydicom.dcmread(engine.deidentify_file(src, tmp_path / "o.dcm", IDS).path)
    assert out.PatientID == IDS.patient_id and out.PatientIdentityRemoved == "YES"
    assert out.pixel_array.shape == pydicom.dcmread(src).pixel_array.shape
