"""deid recipes: every supported construct on a real CT, and every unsupported one refused at load."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from sendit.deid import Deidentifier, DeidError, RecipeError, build_deidentifier, load_recipe, parse_recipe
from sendit.deid.ocr import OcrSettings
from sendit.identifiers import Identifiers
from tests.test_deid_engine import make_ct, write

IDS = Identifiers("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1", jitter_days=-45, custom_fields={"site": "SITE-7"})


def run(text: str, tmp_path: Path, **changes: object) -> pydicom.Dataset:
    ds = make_ct()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    engine = Deidentifier("k", recipe=parse_recipe("FORMAT dicom\n%header\n" + text, "test.recipe"), pixel_filter=None)
    return pydicom.dcmread(engine.deidentify_file(write(ds, tmp_path / "in.dcm"), tmp_path / "out.dcm", IDS).path)


def test_keep_overrides_the_profile_and_is_recorded(tmp_path: Path) -> None:
    out = run("KEEP StudyDescription\nKEEP InstitutionName\nKEEP StudyDate\n", tmp_path)
    assert (out.StudyDescription, out.InstitutionName, out.StudyDate) == ("CT CHEST", "General Hospital", "20240115")
    assert out.ReferencedImageSequence[0].StudyDate == "20231231"  # a rule applies at every level
    assert "recipe kept 4 attribute(s) the profile changes" in out.DeidentificationMethod
    assert out.SeriesDate == "20231201"  # everything else still follows the profile


def test_replace_add_blank_remove_and_values(tmp_path: Path) -> None:
    out = run(
        "REPLACE InstitutionName var:site\n"
        "ADD ClinicalTrialSponsorName My Sponsor\n"
        "ADD (0012,0030) var:patient_id\n"
        "BLANK Manufacturer\n"
        "REMOVE SliceThickness\n"
        "REPLACE StationName func:keyed_hash\n",
        tmp_path,
    )
    assert out.InstitutionName == "SITE-7"
    assert out.ClinicalTrialSponsorName == "My Sponsor"
    assert out.ClinicalTrialSiteID == "SIDPSEUDO1"
    assert "Manufacturer" in out and out.Manufacturer == ""
    assert "SliceThickness" not in out
    assert len(out.StationName) == 16 and out.StationName != "CT01"


def test_field_expressions_and_jitter(tmp_path: Path) -> None:
    out = run(
        "JITTER endswith:Date 10\nREMOVE startswith:Referring\nBLANK contains:Operator\nKEEP (0008,0081)\n",
        tmp_path,
    )
    assert out.StudyDate == "20240125" and out.ReferencedImageSequence[0].StudyDate == "20240110"
    assert "ReferringPhysicianName" not in out
    assert out.OperatorsName == ""
    assert out.InstitutionAddress == "1 Main Street"


def test_jitter_from_a_variable_and_remove_all_with_a_predicate(tmp_path: Path) -> None:
    out = run(
        "JITTER StudyDate var:jitter_days\nKEEP ProtocolName\nREMOVE ALL func:contains_identifier\n",
        tmp_path,
        ProtocolName="CHEST for Smith",
        ConvolutionKernel="B30f",
        ImageType=["ORIGINAL", "PRIMARY", "SMITH"],
    )
    assert out.StudyDate == "20231201"
    assert out.ProtocolName == "CHEST for Smith"  # KEEP outranks REMOVE
    assert "ImageType" not in out  # it named the patient
    assert out.ConvolutionKernel == "B30f"
    assert "Modality" in out and out.Modality == "CT"  # the predicate said no: the profile decides


def test_all_matches_every_attribute(tmp_path: Path) -> None:
    out = run("BLANK ALL\nKEEP startswith:SOP\n", tmp_path)
    assert out.Modality == "" and out.Manufacturer == "" and out.StudyInstanceUID == ""
    assert out.PatientID == "SIDPSEUDO1"  # identifiers are the service's, whatever the recipe says
    with pytest.raises(DeidError, match="SOPInstanceUID is missing"):  # an invalid result fails closed
        run("BLANK ALL\n", tmp_path)


def test_an_undefined_variable_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(DeidError, match="recipe variable 'nope' is not defined"):
        run("REPLACE InstitutionName var:nope\n", tmp_path)


def test_recipe_filters_layer_on_the_default_filter(tmp_path: Path) -> None:
    path = tmp_path / "my.recipe"
    path.write_text("FORMAT dicom\n%filter blacklist\nLABEL my rule\n  equals StationName CT01\n")
    engine = build_deidentifier("k", "retain_long_modified_dates", str(path), "default", ocr=OcrSettings(enabled=False))
    assert len(engine._pixel_rules.blacklist) > 1
    with pytest.raises(DeidError, match="may hold burned-in text: my rule; OCR is off"):
        engine.deidentify_file(write(make_ct(), tmp_path / "a.dcm"), tmp_path / "o.dcm", IDS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("%header\nKEEP Modality\n", "starts with 'FORMAT dicom'"),
        ("FORMAT nifti\n", "only 'FORMAT dicom'"),
        ("FORMAT dicom\n%pixels\n", "section '%pixels' is not supported"),
        ("FORMAT dicom\n%header\nSHOUT Modality\n", "unknown header action 'SHOUT'"),
        ("FORMAT dicom\n%header\nKEEP NotAKeyword\n", "unknown attribute 'NotAKeyword'"),
        ("FORMAT dicom\n%header\nREMOVE select:VR:PN\n", "'select': is not supported"),
        ("FORMAT dicom\n%header\nREPLACE PatientSex func:evil\n", "unknown function 'evil'"),
        ("FORMAT dicom\n%header\nJITTER StudyDate soon\n", "whole number of days"),
        ("FORMAT dicom\n%header\nKEEP PatientID\n", "identifier service"),
        ("FORMAT dicom\n%header\nREPLACE PatientIdentityRemoved NO\n", "set by the engine"),
        ("FORMAT dicom\n%filter redlist\n", "filter group must be one of"),
        ("FORMAT dicom\n%filter graylist\n  contains Modality CT\n", "outside a LABEL"),
        ("FORMAT dicom\n%filter graylist\nLABEL x\n  resembles Modality CT\n", "unknown filter test 'resembles'"),
        ("FORMAT dicom\n%filter graylist\nLABEL x\n  contains Modality (CT\n", "not a valid regular expression"),
        ("FORMAT dicom\n%filter graylist\nLABEL x\n  contains Modality CT\n  keepcoordinates 0,0,1,1\n", "keepcoord"),
        ("FORMAT dicom\n%filter graylist\nLABEL x\n  coordinates from:SequenceOfUltrasoundRegions\n", "from:"),
        ("FORMAT dicom\n%filter graylist\nLABEL x\n  coordinates 10,10,5,5\n", "empty region"),
    ],
)
def test_unsupported_constructs_are_refused_at_load_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(text, "bad.recipe")
    assert str(info.value).startswith("bad.recipe")


def test_parsing_records_criteria_operators_and_both_coordinate_forms() -> None:
    recipe = parse_recipe(
        """FORMAT dicom   # comment
%filter graylist
LABEL Dose # (CTP)
  contains Modality CT
  + contains ImageType SCREEN SAVE || contains SeriesDescription Dose
  || empty Manufacturer
  coordinates 0,0,512,121
  ctpcoordinates 10,20,30,40
""",
        "r",
    )
    (label,) = recipe.filters("graylist")
    assert label.name == "Dose" and label.regions == ((0, 0, 512, 121), (10, 20, 40, 60))
    assert [op for op, _ in label.clauses] == ["and", "and", "or"]
    assert [inner for inner, _ in label.clauses[1][1]] == ["and", "or"]
    assert label.clauses[1][1][0][1].text == "contains ImageType SCREEN SAVE"


def test_deids_own_default_recipe_is_refused_where_it_uses_what_we_do_not_support(tmp_path: Path) -> None:
    """deid's deid.dicom misspells attribute names (``Manfacturer``): reported, not silently ignored."""
    path = tmp_path / "deid.dicom"
    path.write_text("FORMAT dicom\n%filter graylist\nLABEL ADAC\n  equals Rows 832\n  + contains Manfacturer ADAC\n")
    with pytest.raises(RecipeError, match=r"deid.dicom:5: unknown attribute 'Manfacturer'"):
        load_recipe(path)


def test_config_keys_are_validated_at_start_up_one_line_each(tmp_path: Path) -> None:
    from sendit.config import ConfigError, load_config

    (tmp_path / "bad.recipe").write_text("FORMAT dicom\n%header\nKEEP NoSuchThing\n")
    config = tmp_path / "sendit.toml"
    config.write_text('DEID_OPTIONS = "retain_uids, retain_everything"\nDEID_RECIPE = "bad.recipe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config, env={}, require_secret=False)
    problems = [p for p in info.value.problems if p.startswith("DEID_")]
    assert len(problems) == 2
    assert problems[0].startswith("DEID_OPTIONS: unknown de-identification option 'retain_everything'")
    assert problems[1] == "DEID_RECIPE: bad.recipe:3: unknown attribute 'NoSuchThing' (not a keyword or tag number)"
    config.write_text('DEID_OPTIONS = "retain_uids,clean_descriptors"\nDEID_FILTER = "none"\n')
    cfg = load_config(config, env={}, require_secret=False)
    engine = build_deidentifier("k", cfg.DEID_OPTIONS, cfg.DEID_RECIPE, cfg.DEID_FILTER)
    assert engine.options.enabled() == ("retain_uids", "clean_descriptors") and engine.pixel_filter is None
