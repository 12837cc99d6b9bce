"""Burned-in text: the default filter flags what may carry text (OCR then decides: tests/test_deid_ocr.py);
graylist rules blank known layouts; every shipped rule is documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, UltrasoundImageStorage

from sendit.deid import BurnedInError, Deidentifier, DeidError, parse_recipe
from sendit.deid.ocr import OcrSettings, unavailable_reason
from sendit.deid.pixels import Decision, PixelRules, decide
from sendit.deid.recipe import default_filter
from sendit.identifiers import Identifiers
from tests.test_deid_engine import make_ct, pydicom_file, write

IDS = Identifiers("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1", jitter_days=-45)
TOP_BAND = "FORMAT dicom\n%filter graylist\nLABEL top band\n  present Rows\n  ctpcoordinates 0,0,20,10\n"


def secondary_capture_with_text(tmp_path: Path) -> Path:
    """A screen capture of a report: the patient's name is in the pixels, the header says so."""
    ds = make_ct(rows=64)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    return write(ds, tmp_path / "sc.dcm")


needs_tesseract = pytest.mark.skipif(unavailable_reason() != "", reason="needs Debian's tesseract-ocr")


@needs_tesseract
def test_a_secondary_capture_that_says_yes_but_shows_no_readable_text_is_quarantined(tmp_path: Path) -> None:
    src = secondary_capture_with_text(tmp_path)  # the header says YES; the pixels are a ramp OCR cannot read
    dst = tmp_path / "out" / "sc.dcm"
    with pytest.raises(BurnedInError) as info:
        Deidentifier("k").deidentify_file(src, dst, IDS)
    assert info.value.reason == (
        "burned-in annotation: Secondary capture: policy (BurnedInAnnotation is YES); OCR found no text to blank"
    )
    assert isinstance(info.value, DeidError) and not dst.exists()


@needs_tesseract
def test_burned_in_annotation_yes_is_checked_even_without_a_filter(tmp_path: Path) -> None:
    ds = make_ct()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInError, match="^burned-in annotation: BurnedInAnnotation is YES; OCR found no text"):
        Deidentifier("k", pixel_filter=None).deidentify_file(write(ds, tmp_path / "a.dcm"), tmp_path / "o.dcm", IDS)


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        ({"SOPClassUID": SecondaryCaptureImageStorage}, "Secondary capture: policy"),
        ({"Modality": "US", "SOPClassUID": UltrasoundImageStorage}, "Ultrasound without a known layout: policy"),
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, "Screen save: policy"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "REPORTDATA"]}, "Report data: policy"),
        ({"Modality": "CT", "SeriesDescription": "Dose Report"}, "Dose report or outside document: policy"),
        ({"Manufacturer": "", "ImageType": ["DERIVED", "SECONDARY"]}, "Reconstruction without a manufacturer: policy"),
    ],
)
def test_default_policy_rules_flag_a_real_header_for_ocr(changes: dict[str, object], label: str) -> None:
    ds = make_ct()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    assert decide(ds, PixelRules.from_recipes([default_filter()])) == Decision("check", label)


def test_with_ocr_off_a_flagged_image_is_quarantined_naming_the_policy(tmp_path: Path) -> None:
    ds = make_ct()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    engine = Deidentifier("k", ocr=OcrSettings(enabled=False))
    with pytest.raises(BurnedInError) as info:
        engine.deidentify_file(write(ds, tmp_path / "a.dcm"), tmp_path / "o.dcm", IDS)
    assert info.value.reason == "may hold burned-in text: Secondary capture: policy; OCR is off"


def test_an_ordinary_ct_and_an_ultrasound_that_says_no_pass_the_default_filter(tmp_path: Path) -> None:
    ds = make_ct()
    ds.Modality, ds.BurnedInAnnotation = "US", "NO"
    for name, data in (("ct", make_ct()), ("us", ds)):
        Deidentifier("k").deidentify_file(write(data, tmp_path / f"{name}.dcm"), tmp_path / "out" / f"{name}.dcm", IDS)


def test_a_graylist_rule_blanks_its_region_and_records_clean_pixel_data(tmp_path: Path) -> None:
    ds = make_ct(rows=64)
    ds.Manufacturer, ds.ManufacturerModelName, ds.Modality = "Philips Medical", "CX50", "US"
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = np.full((64, 64), 1000, dtype=np.uint16).tobytes()
    result = Deidentifier("k").deidentify_file(write(ds, tmp_path / "a.dcm"), tmp_path / "o.dcm", IDS)
    out = pydicom.dcmread(result.path)
    pixels = out.pixel_array
    assert (pixels[:59, :] == 0).all() and (pixels[59:, :] == 1000).all()  # ctpcoordinates 0,0,800,59, clipped
    assert out.BurnedInAnnotation == "NO"
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100", "113101", "113107"]
    assert "Clean Pixel Data Option (regions blanked)" in out.DeidentificationMethod


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle_2frame.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "MR_small_implicit.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR: decoded to RGB
        "JPEG2000.dcm",
        "JPEGLSNearLossless_16.dcm",
    ],
)
def test_blanking_decodes_compressed_and_native_data_and_writes_explicit_le(name: str, tmp_path: Path) -> None:
    engine = Deidentifier("k", recipe=parse_recipe(TOP_BAND, "top"), pixel_filter=None)
    src = pydicom_file(name)
    out = pydicom.dcmread(engine.deidentify_file(src, tmp_path / "o.dcm", IDS).path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    before, after = pydicom.dcmread(src).pixel_array, out.pixel_array
    frames = after if out.get("NumberOfFrames", 1) > 1 else after[np.newaxis]
    original = before if out.get("NumberOfFrames", 1) > 1 else before[np.newaxis]
    if out.PhotometricInterpretation == "MONOCHROME2":
        assert (frames[:, :10, :20] == 0).all()
    else:
        assert frames[:, :10, :20].max() < 8  # black (YBR black read back as RGB is ~0)
    assert np.array_equal(frames[:, 10:], original[:, 10:])


def test_a_compressed_image_that_cannot_be_decoded_is_quarantined_with_the_reason(tmp_path: Path) -> None:
    engine = Deidentifier("k", recipe=parse_recipe(TOP_BAND, "top"), pixel_filter=None)
    # 12-bit lossy JPEG: libjpeg refuses this test file, so its text cannot be blanked
    with pytest.raises(BurnedInError, match="top band; compressed pixel data could not be decoded"):
        engine.deidentify_file(pydicom_file("JPEG-lossy.dcm"), tmp_path / "o.dcm", IDS)


def test_filter_semantics_whitelist_graylist_without_coordinates_and_operators(tmp_path: Path) -> None:
    recipe = parse_recipe(
        """FORMAT dicom
%filter whitelist
LABEL trusted scanner
  equals StationName CT01
  + notcontains ImageType SECONDARY
%filter graylist
LABEL flag only
  contains Manufacturer NOPE || missing OperatorsName
%filter blacklist
LABEL everything from ACME
  contains Manufacturer ACME
""",
        "semantics",
    )
    engine = Deidentifier("k", recipe=recipe, pixel_filter=None, ocr=OcrSettings(enabled=False))
    engine.deidentify_file(write(make_ct(), tmp_path / "a.dcm"), tmp_path / "o1.dcm", IDS)  # whitelisted
    other = make_ct()
    other.StationName = "CT02"
    with pytest.raises(BurnedInError, match="everything from ACME"):
        engine.deidentify_file(write(other, tmp_path / "b.dcm"), tmp_path / "o2.dcm", IDS)
    del other.OperatorsName
    with pytest.raises(BurnedInError, match="may hold burned-in text: flag only"):  # no coordinates: a flag
        engine.deidentify_file(write(other, tmp_path / "c.dcm"), tmp_path / "o3.dcm", IDS)
    burned = make_ct()
    burned.BurnedInAnnotation = "YES"  # a whitelist never overrides the image's own YES
    with pytest.raises(BurnedInError, match="everything from ACME"):
        engine.deidentify_file(write(burned, tmp_path / "d.dcm"), tmp_path / "o4.dcm", IDS)


def test_the_shipped_filter_loads_and_has_the_expected_groups() -> None:
    recipe = default_filter()
    assert not recipe.header and not recipe.filters("whitelist")
    assert len(recipe.filters("graylist")) > 20 and len(recipe.filters("blacklist")) >= 6
    assert all(label.regions for label in recipe.filters("graylist")[1:])
    # a rule that flags without coordinates says it is policy, not that text was seen
    flags = [label for label in recipe.labels if not label.regions]
    assert flags and all(label.name.endswith(": policy") for label in flags)


def test_docs_list_every_shipped_rule() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "deidentification.md").read_text(encoding="utf-8")
    missing = [label.name for label in default_filter().labels if label.name not in docs]
    assert not missing, missing
