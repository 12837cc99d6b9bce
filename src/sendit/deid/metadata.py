"""Per-series metadata for researchers: an allow-list of header fields, de-identified, as JSON.

Only the fields below leave, each through its own transform; everything else in the header is
ignored. Values come from the *original* header of the series' first image (so the study
description can be cleaned rather than lost), identifiers and UIDs from the de-identified result.

=========================  ===========================================================================
field                      transform
=========================  ===========================================================================
modality                   as is (CS)
body_part_examined         as is (CS)
study_description          :func:`sendit.deid.scrub.scrub`: names, dates, IDs, phone numbers, e-mail
                           addresses and unlisted words replaced by typed placeholders (``[NAME]``…),
                           with the image's known identifiers and its institution's acronyms
series_description,        the same
protocol_name
procedure_codes            controlled values: the codes of Procedure, Requested Procedure, Performed
                           Protocol Code Sequences as ``{scheme, code, meaning}``, standard schemes
                           only (:data:`STANDARD_SCHEMES`); the meaning is the standard's own where
                           pydicom knows the code, else the image's meaning scrubbed
anatomic_region_codes      the same for Anatomic Region Sequence
sex                        ``M``, ``F`` or ``O``; anything else is left out
age_bucket                 5-year buckets (``40-44``), ``90+`` for 90 and over; from Patient's Age,
                           or from birth date and study date when the age is missing
manufacturer, model        as is (LO), cut to 64 characters
sop_class                  the SOP Class UID and its name ("private" for a vendor's own class)
images                     how many images of the series were de-identified
slice_thickness, kvp,      numbers as written (DS); left out when not a number
magnetic_field_strength
pseudonym, study_uid,      the de-identified values (pseudonymized patient ID, remapped UIDs)
series_uid
=========================  ===========================================================================

The relay writes this to ``WORK_FOLDER/series-<id>/metadata.json``; ``sendit deid IN OUT`` writes
``OUT/<pseudonym>/<study>/<series>/series.json``. The Datastore destination
(:mod:`sendit.destinations.google.datastore`) takes the same document from there.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import MAX_VALUE_LEN

from sendit.deid.scrub import scrub, site_tokens
from sendit.dicomio import quiet, read_dicom

SCHEMA = "sendit.series-metadata/1"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_CODE = re.compile(rf"[A-Z0-9 _]{{1,{MAX_VALUE_LEN['CS']}}}")
_LO = MAX_VALUE_LEN["LO"]
_CODE_VALUE = re.compile(r"[\w.:/-]{1,64}")
#: Coding schemes of the standard (PS3.16 Table 8-1) whose codes leave as they are. A private scheme
#: ("99…", a site's own) can encode the site, so only its scrubbed meaning could; it is left out.
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "SRT", "LN", "RADLEX", "NCIt", "UMLS", "FMA", "MDC", "UCUM", "I10", "I9C", "C4", "C5", "NDC"}
)
_DESCRIPTIONS = (
    ("study_description", "StudyDescription"),
    ("series_description", "SeriesDescription"),
    ("protocol_name", "ProtocolName"),
)
_PROCEDURE_SEQUENCES = ("ProcedureCodeSequence", "RequestedProcedureCodeSequence", "PerformedProtocolCodeSequence")


def _text(ds: Dataset, keyword: str) -> str:
    with quiet():
        try:
            value = ds.get(keyword)
        except Exception:
            return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip(" \x00")


def age_bucket(age_years: int) -> str:
    """``47`` → ``"45-49"``; 90 and over → ``"90+"``."""
    if age_years >= 90:
        return "90+"
    low = max(0, age_years) // 5 * 5
    return f"{low}-{low + 4}"


def _age_years(ds: Dataset) -> int | None:
    match = _AGE.match(_text(ds, "PatientAge"))
    if match:
        number, unit = int(match.group(1)), match.group(2)
        return number if unit == "Y" else 0
    birth, study = _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
    try:
        born = dt.datetime.strptime(birth[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(study[:8], "%Y%m%d").date()
    except ValueError:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if years >= 0 else None


@functools.cache
def _standard_meanings() -> dict[tuple[str, str], str]:
    """(scheme, code) → the standard's code meaning, from the concepts pydicom ships (PS3.16)."""
    try:
        from pydicom.sr._concepts_dict import concepts
    except ImportError:  # a pydicom without its concept table: the scrubbed meaning stands in
        return {}
    table = cast(dict[str, dict[str, dict[str, tuple[str, list[int]]]]], concepts)  # scheme → keyword → code
    meanings: dict[tuple[str, str], str] = {}
    for scheme, by_keyword in table.items():
        for by_code in by_keyword.values():
            for code, (meaning, cids) in by_code.items():
                if cids or (scheme, code) not in meanings:  # DICOM's own wording: the one in a CID
                    meanings[(scheme, code)] = meaning
    return meanings


def coded_values(header: Dataset, keywords: Iterable[str], known: set[str]) -> list[dict[str, str]]:
    """The standard-scheme codes of the named sequences' items, each once, in order."""
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for keyword in keywords:
        with quiet():
            try:
                items = header.get(keyword) or ()
            except Exception:
                continue
        for item in items:
            scheme, code = _text(item, "CodingSchemeDesignator"), _text(item, "CodeValue")
            if scheme not in STANDARD_SCHEMES or not _CODE_VALUE.fullmatch(code) or (scheme, code) in seen:
                continue
            seen.add((scheme, code))
            meaning = _standard_meanings().get((scheme, code)) or scrub(_text(item, "CodeMeaning"), known)
            out.append({"scheme": scheme, "code": code, "meaning": meaning[:_LO]})
    return out


def describe_series(header: Dataset, known_identifiers: Iterable[str]) -> dict[str, Any]:
    """The allow-listed fields of one series from its first image's *original* header."""
    known = {token.lower() for token in known_identifiers}  # the scrubber compares lower case
    known |= site_tokens(_text(header, k) for k in ("InstitutionName", "InstitutionalDepartmentName"))
    out: dict[str, Any] = {}
    for key, keyword in (("modality", "Modality"), ("body_part_examined", "BodyPartExamined")):
        value = _text(header, keyword)
        if value and _CODE.fullmatch(value):
            out[key] = value
    for key, keyword in _DESCRIPTIONS:
        value = _text(header, keyword)
        scrubbed = scrub(value, known) if value else ""
        if scrubbed:
            out[key] = scrubbed[:_LO]
    for key, keywords in (
        ("procedure_codes", _PROCEDURE_SEQUENCES),
        ("anatomic_region_codes", ("AnatomicRegionSequence",)),
    ):
        codes = coded_values(header, keywords, known)
        if codes:
            out[key] = codes
    sex = _text(header, "PatientSex").upper()
    if sex in ("M", "F", "O"):
        out["sex"] = sex
    years = _age_years(header)
    if years is not None:
        out["age_bucket"] = age_bucket(years)
    for key, keyword in (("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName")):
        value = _text(header, keyword)
        if value:
            out[key] = value[:_LO]
    sop_class = _text(header, "SOPClassUID")
    if sop_class:
        uid = UID(sop_class)
        if uid.is_valid and uid.name != sop_class:  # a class the standard registers
            out["sop_class"] = sop_class
            out["sop_class_name"] = uid.name
        else:  # a vendor's own class UID can point to a site: not exported
            out["sop_class"] = "private"
    for key, keyword in (
        ("slice_thickness", "SliceThickness"),
        ("kvp", "KVP"),
        ("magnetic_field_strength", "MagneticFieldStrength"),
    ):
        value = _text(header, keyword)
        if _NUMBER.match(value):
            out[key] = float(value)
    return out


def series_document(
    described: dict[str, Any], *, pseudonym: str, study_uid: str, series_uid: str, images: int
) -> dict[str, Any]:
    """The JSON document for one series (``described`` from :func:`describe_series`)."""
    return {
        "schema": SCHEMA,
        "pseudonym": pseudonym,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "images": images,
        **described,
    }


def write_document(document: dict[str, Any], path: Path) -> Path:
    """Write atomically (``.part`` then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    part.replace(path)
    return path


def write_series_document(
    source: Path,
    known_identifiers: Callable[[Dataset], Iterable[str]],
    path: Path,
    *,
    pseudonym: str,
    study_uid: str,
    series_uid: str,
    images: int,
) -> Path:
    """Describe a series from one of its *original* files (headers only) and write its document.

    ``known_identifiers`` is the engine's (:meth:`sendit.deid.Deidentifier.known_identifiers`);
    raises :class:`sendit.dicomio.UnreadableFile` when ``source`` cannot be read.
    """
    header = read_dicom(source, headers_only=True)
    with quiet():
        described = describe_series(header, known_identifiers(header))
    document = series_document(
        described, pseudonym=pseudonym, study_uid=study_uid, series_uid=series_uid, images=images
    )
    return write_document(document, path)
