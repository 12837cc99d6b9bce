"""Judging the service's answers: every patient and item asked about answered exactly once, nothing else,
and every value usable in DICOM; then the answers turned into ``Identifiers`` per series.

Anything short of that raises ``IdentifierError`` (not retryable: a person must look), so the caller
never falls back to the original identifiers. Messages name positions and counts, never a value.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.valuerep import MAX_VALUE_LEN

from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader
from sendit.identifiers.dasher.query import Patient
from sendit.identifiers.dasher.settings import DasherSettings

PROVIDER_NAME = "dasher"
PATIENT_NAME_MAX = 64  # one PN component group (pydicom's table has no PN entry)


@dataclass
class PatientAnswer:
    suid: str
    jitter: int
    custom_fields: dict[str, str]
    raw: dict[str, Any]  # the result without its items


@dataclass
class ItemAnswer:
    suid: str
    custom_fields: dict[str, str]
    raw: dict[str, Any]
    patient_raw: dict[str, Any]


def rejected(message: str) -> IdentifierError:
    """The error for an answer we will not use."""
    return IdentifierError(f"identifier service answer rejected: {message}", retryable=False)


def check_suid(value: Any, original: str, vr: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise rejected(f"{where} has an empty or missing suid")
    suid = value.strip()
    if suid == original.strip():
        raise rejected(f"{where} returned the original identifier as its suid")
    if len(suid) > MAX_VALUE_LEN[vr]:
        raise rejected(f"{where} has a suid longer than {MAX_VALUE_LEN[vr]} characters (DICOM {vr})")
    if "\\" in suid or any(ord(c) < 32 for c in suid):
        raise rejected(f"{where} has a suid with characters DICOM does not allow")
    return suid


def check_jitter(value: Any, bound: int, where: str) -> int:
    # bool is an int subclass and a float such as 3.0 would silently truncate elsewhere: both refused.
    if type(value) is not int:
        raise rejected(f"{where} has a jitter that is not an integer number of days")
    if value == 0:
        raise rejected(f"{where} has a jitter of 0 days (dates would not be shifted)")
    if abs(value) > bound:
        raise rejected(f"{where} has a jitter outside ±{bound} days (DASHER_JITTER_BOUND)")
    return value


def check_custom_fields(value: Any, where: str) -> dict[str, str]:
    """DASHER sends ``[{"key", "value"}]``; a plain object is accepted too, since services differ."""
    if value is None:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(value, list):
        pairs = []
        for entry in value:
            if not isinstance(entry, dict) or "key" not in entry or "value" not in entry:
                raise rejected(f"{where} has custom_fields entries without key and value")
            pairs.append((entry["key"], entry["value"]))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise rejected(f"{where} has custom_fields that are neither a list nor an object")
    fields: dict[str, str] = {}
    for key, val in pairs:
        if not isinstance(key, str) or isinstance(val, bool) or not isinstance(val, str | int):
            raise rejected(f"{where} has a custom field that is not a name with a text or integer value")
        fields[key] = str(val)
    return fields


def key_of(entry: dict[str, Any], where: str) -> tuple[str, str]:
    entry_id, source = entry.get("id"), entry.get("id_source")
    if not isinstance(entry_id, str) or not isinstance(source, str):
        raise rejected(f"{where} lacks a text id or id_source")
    return entry_id, source


def item_key(patient_id: str, accession: str) -> str:
    return f"{patient_id}\x00{accession}"


def check_answer(
    data: Any, chunk: list[Patient], settings: DasherSettings, where: str
) -> tuple[dict[str, PatientAnswer], dict[str, ItemAnswer]]:
    """The answer to one request: every requested patient and item exactly once, nothing else."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise rejected(f"{where}: the answer is not an object with a 'results' list")
    requested = {(p.patient_id, settings.id_source): p for p in chunk}
    results: list[Any] = data["results"]
    patients: dict[str, PatientAnswer] = {}
    items: dict[str, ItemAnswer] = {}
    for result_index, result in enumerate(results, 1):
        result_at = f"{where}, result {result_index} of {len(results)}"
        if not isinstance(result, dict):
            raise rejected(f"{result_at} is not an object")
        patient = requested.get(key_of(result, result_at))
        if patient is None:
            raise rejected(f"{result_at} answers for a patient that was not asked about")
        if patient.patient_id in patients:
            raise rejected(f"{result_at} answers for the same patient twice")
        suid = check_suid(result.get("suid"), patient.patient_id, "LO", result_at)
        jitter = check_jitter(result.get("jitter"), settings.jitter_bound, result_at)
        custom = check_custom_fields(result.get("custom_fields"), result_at)
        raw_items = result.get("items", [])
        if raw_items is None:
            raw_items = []
        if not isinstance(raw_items, list):
            raise rejected(f"{result_at} has 'items' that is not a list")
        patient_raw = {k: copy.deepcopy(v) for k, v in result.items() if k != "items"}
        patients[patient.patient_id] = PatientAnswer(suid, jitter, custom, patient_raw)
        answered: set[str] = set()
        for item_index, item in enumerate(raw_items, 1):
            item_at = f"{result_at}, item {item_index} of {len(raw_items)}"
            if not isinstance(item, dict):
                raise rejected(f"{item_at} is not an object")
            item_id, item_source = key_of(item, item_at)
            if item_source != settings.item_id_source or item_id not in patient.items:
                raise rejected(f"{item_at} answers for an item that was not asked about")
            if item_id in answered:
                raise rejected(f"{item_at} answers for the same item twice")
            answered.add(item_id)
            item_suid = check_suid(item.get("suid"), item_id, "SH", item_at)
            # The patient's jitter is the study's shift; an item may repeat it or leave it out,
            # but two different shifts for one patient would scramble the timeline.
            if item.get("jitter") is not None:
                item_jitter = check_jitter(item.get("jitter"), settings.jitter_bound, item_at)
                if item_jitter != jitter:
                    raise rejected(f"{item_at} has a jitter different from its patient's")
            item_custom = check_custom_fields(item.get("custom_fields"), item_at)
            items[item_key(patient.patient_id, item_id)] = ItemAnswer(
                item_suid, item_custom, copy.deepcopy(item), patient_raw
            )
        missing_items = len(patient.items) - len(answered)
        if missing_items:
            raise rejected(f"{result_at} lacks {missing_items} of {len(patient.items)} requested item(s)")
    missing = len(requested) - len(patients)
    if missing:
        raise rejected(f"{where}: the answer lacks {missing} of {len(requested)} requested patient(s)")
    return patients, items


def merge(
    patients: dict[str, PatientAnswer],
    new_patients: Mapping[str, PatientAnswer],
    items: dict[str, ItemAnswer],
    new_items: Mapping[str, ItemAnswer],
) -> None:
    """Answers from several requests must agree about a patient (same suid, same jitter)."""
    for key, answer in new_patients.items():
        known = patients.get(key)
        if known is None:
            patients[key] = answer
        elif (known.suid, known.jitter) != (answer.suid, answer.jitter):
            raise rejected("two requests got different suid or jitter for the same patient")
    for key, item in new_items.items():
        known_item = items.get(key)
        if known_item is None:
            items[key] = item
        elif known_item.suid != item.suid:
            raise rejected("two requests got different suids for the same item")


def identifiers_for(
    header: SeriesHeader,
    patients: Mapping[str, PatientAnswer],
    items: Mapping[str, ItemAnswer],
    settings: DasherSettings,
    name_fields: list[str],
) -> Identifiers:
    """One series' replacement values: the patient's suid and jitter, its accession's suid, the name
    from PATIENT_NAME_FORMAT and the fields CUSTOM_FIELD_MAP asks for; the answer is kept as ``raw``."""
    patient_id = header.patient_id.strip()
    accession = header.accession_number.strip()
    patient = patients[patient_id]
    item = items.get(item_key(patient_id, accession)) if accession else None
    fields = {**patient.custom_fields, **(item.custom_fields if item else {})}
    custom: dict[str, str] = {}
    for name, keyword in settings.custom_field_map.items():
        if name not in fields:
            raise rejected(f"custom field {name!r} (CUSTOM_FIELD_MAP) is missing from the answer")
        custom[keyword] = fields[name]
    values = {k: v for k, v in fields.items() if k.isidentifier()}
    values.update(suid=patient.suid, item_suid=item.suid if item else "", study=settings.study)
    for name in name_fields:
        if name not in values:
            raise rejected(f"PATIENT_NAME_FORMAT uses {{{name}}}, which the answer does not provide")
    try:
        patient_name = settings.patient_name_format.format_map(values)
    except (ValueError, TypeError):
        raise rejected("PATIENT_NAME_FORMAT cannot format the values in the answer") from None
    if len(patient_name) > PATIENT_NAME_MAX or "\\" in patient_name or not patient_name.strip():
        raise rejected(
            f"PATIENT_NAME_FORMAT gives a name that is empty, longer than {PATIENT_NAME_MAX} "
            "characters or has a backslash"
        )
    raw_result = copy.deepcopy(item.patient_raw if item else patient.raw)
    raw_result["items"] = [copy.deepcopy(item.raw)] if item else []
    return Identifiers(
        patient_id=patient.suid,
        patient_name=patient_name,
        accession_number=item.suid if item else "",
        jitter_days=patient.jitter,
        custom_fields=custom,
        provider=PROVIDER_NAME,
        raw={"provider": PROVIDER_NAME, "study": settings.study, "result": raw_result},
    )
