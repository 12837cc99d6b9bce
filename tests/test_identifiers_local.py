"""The local keyed provider: stable pseudonyms and a per-patient date shift that is never 0."""

from __future__ import annotations

import pytest

from sendit.identifiers import SeriesHeader
from sendit.identifiers.local import LocalProvider


def header(series: str, patient: str, accession: str = "A1", study: str = "1.2.3") -> SeriesHeader:
    return SeriesHeader(series_uid=series, study_uid=study, patient_id=patient, accession_number=accession)


def test_same_patient_same_values_across_series_calls_and_instances() -> None:
    first = LocalProvider("key-one").identify([header("1", "MRN1"), header("2", "MRN1", "A2")])
    again = LocalProvider("key-one").identify([header("3", "MRN1")])
    assert first["1"].patient_id == first["2"].patient_id == again["3"].patient_id
    assert first["1"].jitter_days == first["2"].jitter_days == again["3"].jitter_days
    assert first["1"].accession_number != first["2"].accession_number
    assert first["1"].accession_number == again["3"].accession_number  # same patient, same accession


def test_other_key_or_patient_gives_other_values_and_nothing_original_survives() -> None:
    a = LocalProvider("key-one").identify([header("1", "MRN1")])["1"]
    b = LocalProvider("key-two").identify([header("1", "MRN1")])["1"]
    c = LocalProvider("key-one").identify([header("1", "MRN2")])["1"]
    assert len({a.patient_id, b.patient_id, c.patient_id}) == 3
    assert "MRN1" not in a.patient_id + a.patient_name + a.accession_number + str(a.raw)
    assert len(a.accession_number) <= 16 and len(a.patient_id) <= 64  # SH and LO


def test_shift_is_drawn_from_the_range_and_never_zero() -> None:
    provider = LocalProvider("k", min_days=-2, max_days=2)
    shifts = {provider.identify([header("s", f"P{i}")])["s"].jitter_days for i in range(200)}
    assert shifts == {-2, -1, 1, 2}
    with pytest.raises(ValueError):
        LocalProvider("k", min_days=0, max_days=0)


def test_patients_without_id_are_not_merged() -> None:
    provider = LocalProvider("k")
    nobody_a = SeriesHeader(series_uid="1", study_uid="1.1", patient_id="", patient_name="DOE^JANE")
    nobody_b = SeriesHeader(series_uid="2", study_uid="1.2", patient_id="", patient_name="ROE^RICH")
    answers = provider.identify([nobody_a, nobody_b])
    assert answers["1"].patient_id != answers["2"].patient_id
