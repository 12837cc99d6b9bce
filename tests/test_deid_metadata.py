"""Researcher metadata: only allow-listed, de-identified fields."""

from __future__ import annotations

from pydicom.dataset import Dataset

from sendit.deid.metadata import age_bucket, describe_series


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
