"""What we ask the service: each study's patients with their accessions as items, in bounded requests.

Dates go out as ISO text (``id_timestamp``); a date that is not a real date is left out rather than
guessed, and a broken time keeps its date. No network here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sendit.identifiers.base import IdentifierError, SeriesHeader


@dataclass
class Item:
    """One accession of a patient, as asked about."""

    accession: str
    timestamp: str | None


@dataclass
class Patient:
    """One patient of a study, as asked about, with the items of this request."""

    patient_id: str
    timestamp: str | None
    items: dict[str, Item] = field(default_factory=dict)


def iso_date(value: str) -> str | None:
    """DICOM DA (also the old ``YYYY.MM.DD``) to ISO; None when absent or not a real date."""
    digits = value.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def iso_datetime(da: str, tm: str) -> str | None:
    """StudyDate + StudyTime to a naive ISO datetime (DICOM carries no zone); midnight when TM is absent."""
    day = iso_date(da)
    if day is None:
        return None
    clock = tm.strip().replace(":", "").split(".")[0]
    if not clock:
        clock = "000000"
    if not clock.isdigit() or len(clock) not in (2, 4, 6):
        clock = "000000"  # a broken time must not lose the date
    clock = clock.ljust(6, "0")
    hour, minute, second = int(clock[:2]), int(clock[2:4]), min(int(clock[4:6]), 59)  # TM allows 60
    if hour > 23 or minute > 59:
        hour = minute = second = 0
    return datetime.fromisoformat(day).replace(hour=hour, minute=minute, second=second).isoformat()


def patients_by_study(series: list[SeriesHeader]) -> dict[str, list[Patient]]:
    """Patients (with their accessions as items) per StudyInstanceUID, in the order the series came."""
    studies: dict[str, dict[str, Patient]] = {}
    seen: dict[str, SeriesHeader] = {}
    for index, header in enumerate(series, 1):
        where = f"series {index} of {len(series)}"
        if not header.series_uid:
            raise IdentifierError(f"{where} has no SeriesInstanceUID")
        if header.series_uid in seen and seen[header.series_uid] != header:
            raise IdentifierError(f"{where} repeats an earlier series with different headers")
        seen[header.series_uid] = header
        patient_id = header.patient_id.strip()
        if not patient_id:
            raise IdentifierError(f"{where} has no PatientID; the identifier service needs one")
        study = studies.setdefault(header.study_uid, {})
        patient = study.get(patient_id)
        if patient is None:
            patient = study[patient_id] = Patient(patient_id, iso_date(header.patient_birth_date))
        elif patient.timestamp is None:
            patient.timestamp = iso_date(header.patient_birth_date)
        accession = header.accession_number.strip()
        if accession:
            stamp = iso_datetime(header.study_date, header.study_time)
            item = patient.items.get(accession)
            if item is None:
                patient.items[accession] = Item(accession, stamp)
            elif item.timestamp is None:
                item.timestamp = stamp
    return {uid: list(patients.values()) for uid, patients in studies.items()}


def split(patients: list[Patient], cap: int) -> list[list[Patient]]:
    """Split a study's patients so no request names more than ``cap`` items.

    A patient with many items is repeated across requests with a share of them each; a patient without
    items still takes one slot, so every request stays bounded.
    """
    chunks: list[list[Patient]] = []
    current: list[Patient] = []
    used = 0
    for patient in patients:
        items = list(patient.items.values())
        pieces = [items[i : i + cap] for i in range(0, len(items), cap)] or [[]]
        for piece in pieces:
            weight = max(1, len(piece))
            if current and used + weight > cap:
                chunks.append(current)
                current, used = [], 0
            current.append(Patient(patient.patient_id, patient.timestamp, {i.accession: i for i in piece}))
            used += weight
    if current:
        chunks.append(current)
    return chunks


def request_body(chunk: list[Patient], id_source: str, item_id_source: str) -> dict[str, Any]:
    """The JSON body of one ``POST /uid/{study}``."""
    identifiers = []
    for patient in chunk:
        entry: dict[str, Any] = {"id": patient.patient_id, "id_source": id_source}
        if patient.timestamp:
            entry["id_timestamp"] = patient.timestamp
        entry["items"] = []
        for item in patient.items.values():
            item_entry: dict[str, Any] = {"id": item.accession, "id_source": item_id_source}
            if item.timestamp:
                item_entry["id_timestamp"] = item.timestamp
            entry["items"].append(item_entry)
        identifiers.append(entry)
    return {"identifiers": identifiers}
