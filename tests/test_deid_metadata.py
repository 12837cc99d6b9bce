"""Researcher metadata: only allow-listed, de-identified fields."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.dataset import Dataset

from sendit.deid import Deidentifier
from sendit.deid.metadata import age_bucket, describe_series, write_series_document
from tests.test_deid_engine import make_ct, write


def header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_registered_sop_class_is_named_and_a_private_one_is_not_exported() -> None:
    ct = describe_series(header(SOPClassUID="1.2.840.10008.5.1.4.1.1.2", Modality="CT"), [])
    assert ct["sop_class"] == "1.2.840.10008.5.1.4.1.1.2" and ct["sop_class_name"] == "CT Image Storage"
    vendor = describe_series(header(SOPClassUID="1.3.12.2.1107.5.9.1", Modality="CT"), [])
    assert vendor["sop_class"] == "private" and "1.3.12" not in str(vendor)


def test_descriptions_lose_known_identifiers_and_age_is_bucketed() -> None:
    out = describe_series(header(StudyDescription="CT CHEST GARCIA 20210103", PatientAge="047Y"), ["GARCIA"])
    assert "GARCIA" not in str(out) and "20210103" not in str(out)
    assert out["age_bucket"] == age_bucket(47)
    assert age_bucket(93) == "90+"


def test_descriptions_are_scrubbed_of_names_the_image_does_not_carry() -> None:
    out = describe_series(
        header(SeriesDescription="T1 AX post Dr Smith 2021-03-04", StudyDescription="MR BRAIN PI Wrzosowska CHUV"), []
    )
    assert out["series_description"] == "T1 AX post Dr [NAME] [DATE]"
    assert out["study_description"] == "MR BRAIN PI [NAME] [WORD]"


def test_protocol_name_is_scrubbed_and_the_institutions_acronym_goes() -> None:
    ds = header(ProtocolName="t1_mprage_sag CHUV 555-1234", InstitutionName="Centre Hospitalier Universitaire Vaudois")
    out = describe_series(ds, [])
    assert out["protocol_name"] == "t1_mprage_sag [NAME] [PHONE]"


def test_procedure_codes_are_controlled_values_from_standard_schemes() -> None:
    ds = header(StudyDescription="CT HEAD")
    ds.ProcedureCodeSequence = [Dataset(), Dataset()]
    coded, local = ds.ProcedureCodeSequence
    coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = "T-D1100", "SRT", "Head Dr Smith"
    local.CodeValue, local.CodingSchemeDesignator, local.CodeMeaning = "CHUV123", "99CHUV", "Head CHUV"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "69536005", "SCT", "whatever the site wrote"
    ds.AnatomicRegionSequence = [region]
    out = describe_series(ds, [])
    assert out["procedure_codes"] == [{"scheme": "SRT", "code": "T-D1100", "meaning": "Head Dr [NAME]"}]
    assert out["anatomic_region_codes"] == [{"scheme": "SCT", "code": "69536005", "meaning": "Head"}]
    assert "CHUV" not in str(out)


def test_series_document_written_from_a_file_is_scrubbed(tmp_path: Path) -> None:
    ds = make_ct()
    ds.SeriesDescription = "T1 AX post Dr Smith 2021-03-04"
    src = write(ds, tmp_path / "in.dcm")
    engine = Deidentifier("k", pixel_filter=None)
    path = write_series_document(
        src,
        engine.known_identifiers,
        tmp_path / "series.json",
        pseudonym="P",
        study_uid="1.2",
        series_uid="1.3",
        images=1,
    )
    document = json.loads(path.read_text())
    assert document["series_description"] == "T1 AX post Dr [NAME] [DATE]"
    assert "Smith" not in path.read_text() and "2021" not in path.read_text()
