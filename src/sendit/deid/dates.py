"""Date and time shifting: every instant of one patient moves by one offset, precision and UTC offset kept.

The offset (:class:`Shift`) is the identifiers' whole days plus their seconds within a day (the local
provider keys them per patient, so a time of day is no longer the original one while every interval
between two instants of the patient stays exact; a service that states dates, like DASHER, gives 0
seconds, so its dates stay exactly the answer's). What that means per VR:

* DT: the date and time move together (a value with no time part moves by whole days);
* TM: moves by the seconds, round the clock; when its paired DA stands in the same data set
  (``StudyDate``/``StudyTime``, ``DateOfLastCalibration``/``TimeOfLastCalibration``: the keyword with
  ``Date`` for ``Time``, :data:`DATE_OF_TIME`) the day it crosses into is carried into that date;
* DA: moves by the days, plus the day its paired TM carried.

A value that is not a date or time (malformed, or shifted out of the calendar) raises
:class:`~sendit.deid.elements.BadValue`: the engine refuses to guess, and the image is quarantined
with the tag named.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from sendit.deid.elements import BadValue, strings

#: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], as PS3.5 Table 6.2-1 writes DT.
_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{6}(?:\.\d{1,6})?|\d{4}|\d{2})?([+-]\d{4})?$")
#: HH[MM[SS[.F]]] (PS3.5 Table 6.2-1; the ACR-NEMA form HH:MM:SS accepted and written back as DICOM).
_TM_RE = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d+)?)?)?$")
_DAY = 86400


@dataclass(frozen=True)
class Shift:
    """How far one patient's dates and times move: whole days, then seconds (0 ≤ seconds < a day)."""

    days: int
    seconds: int = 0


def _date_of_time() -> dict[int, int]:
    found: dict[int, int] = {}
    for tag, (vr, _vm, _name, _retired, keyword) in DicomDictionary.items():
        if vr != "TM" or "Time" not in keyword:
            continue
        date = tag_for_keyword(keyword.replace("Time", "Date", 1))
        if date is not None and DicomDictionary[date][0] == "DA":
            found[tag] = date
    return found


#: A TM attribute's tag → the tag of the DA attribute that holds its day (pydicom's dictionary).
DATE_OF_TIME: Mapping[int, int] = _date_of_time()
#: A DA attribute's tag → the tag of its time of day.
TIME_OF_DATE: Mapping[int, int] = {date: time for time, date in DATE_OF_TIME.items()}


def _days_shifted(year: int, month: int, day: int, days: int) -> dt.date:
    try:
        return dt.date(year, month, day) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        raise BadValue("date is not a valid calendar date or leaves the supported range") from None


def shift_da(value: str, days: int) -> str:
    """Shift one DA value (``YYYYMMDD``; legacy ``YYYY.MM.DD`` accepted) by whole days."""
    text = value.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        raise BadValue("malformed DA value")
    new = _days_shifted(int(text[:4]), int(text[4:6]), int(text[6:]), days)
    return f"{new.year:04d}{new.month:02d}{new.day:02d}"


def _time_parts(text: str, what: str) -> tuple[int, int | None, int | None, str]:
    """(hours, minutes, seconds, fraction) of HH[MM[SS[.F]]]; missing parts None."""
    match = _TM_RE.match(text)
    if match is None:
        raise BadValue(f"malformed {what} value")
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:  # 60: a leap second
        raise BadValue(f"malformed {what} value")
    return (
        int(hours),
        None if minutes is None else int(minutes),
        None if seconds is None else int(seconds),
        fraction or "",
    )


def _time_text(total: int, minutes: int | None, seconds: int | None, fraction: str) -> str:
    """Seconds since midnight written back at the precision of the value it came from."""
    hours, rest = divmod(total, 3600)
    if minutes is None:
        return f"{hours:02d}"
    if seconds is None:
        return f"{hours:02d}{rest // 60:02d}"
    return f"{hours:02d}{rest // 60:02d}{rest % 60:02d}{fraction}"


def shift_tm(value: str, seconds: int) -> tuple[str, int]:
    """Shift one TM value by ``seconds`` round the clock; returns it and the days it crossed (0 or 1)."""
    hours, minutes, secs, fraction = _time_parts(value.strip(), "TM")
    carried, total = divmod(hours * 3600 + (minutes or 0) * 60 + (secs or 0) + seconds, _DAY)
    return _time_text(total, minutes, secs, fraction), carried


def shift_dt(value: str, days: int, seconds: int = 0) -> str:
    """Shift one DT value by whole days and seconds, keeping its precision and UTC offset.

    A value with only a year (or year and month) is shifted from the first day of that period and
    written back with the same precision; a value with no time part moves by the days only.
    """
    text = value.strip()
    match = _DT_RE.match(text)
    if match is None:
        raise BadValue("malformed DT value")
    year, month, day, time_part, offset = match.groups()
    if time_part is not None and day is None:
        raise BadValue("malformed DT value")
    time_text = ""
    if time_part is not None:
        hours, minutes, secs, fraction = _time_parts(time_part, "DT")
        carried, total = divmod(hours * 3600 + (minutes or 0) * 60 + (secs or 0) + seconds, _DAY)
        days += carried
        time_text = _time_text(total, minutes, secs, fraction)
    new = _days_shifted(int(year), int(month or 1), int(day or 1), days)
    if month is None:
        date_text = f"{new.year:04d}"
    elif day is None:
        date_text = f"{new.year:04d}{new.month:02d}"
    else:
        date_text = f"{new.year:04d}{new.month:02d}{new.day:02d}"
    return date_text + time_text + (offset or "")


#: Days each TM value of one data set carried, kept until its paired DA is shifted:
#: (id of the data set, tag of the TM) → one count per value.
Carried = MutableMapping[tuple[int, int], tuple[int, ...]]


def shift_element(
    ds: Dataset,
    tag: int,
    elem: DataElement | RawDataElement,
    vr: str,
    shift: Shift | int,
    carried: Carried | None = None,
) -> None:
    """Replace a DA, DT or TM element's every value (empty ones stay empty) by its shifted value.

    ``shift`` in whole days (an int) moves DA and DT only. ``carried`` (one per image) lets a DA see
    the days its paired TM carried when the TM came first in the walk.
    """
    if isinstance(shift, int):
        shift = Shift(shift)
    values = strings(elem)
    if not values:
        return
    if vr == "DA":
        carries = _carries_into(ds, tag, shift, carried) if shift.seconds else ()
        new = [
            shift_da(v, shift.days + (carries[i] if i < len(carries) else 0)) if v else v for i, v in enumerate(values)
        ]
    elif vr == "DT":
        new = [shift_dt(v, shift.days, shift.seconds) if v else v for v in values]
    elif vr == "TM":
        if not shift.seconds:
            return
        pairs = [shift_tm(v, shift.seconds) if v else (v, 0) for v in values]
        new = [text for text, _ in pairs]
        if carried is not None and tag in DATE_OF_TIME:
            carried[(id(ds), tag)] = tuple(days for _, days in pairs)
    else:
        return
    _store(ds, tag, vr, new)


def _store(ds: Dataset, tag: int, vr: str, values: list[str]) -> None:
    """Store shifted values (ASCII digits, a sign, a dot) raw, as a reader would have found them: the
    writer then copies their bytes, no conversion on the way (a date is shifted in most elements)."""
    data = "\\".join(values).encode("ascii")
    if len(data) & 1:
        data += b" "  # PS3.5 6.2: text values are padded to even length with a space
    implicit, little = ds.original_encoding  # (None, None) for a data set not read from a file
    ds[tag] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, bool(implicit), little is not False, True, False)


def _carries_into(ds: Dataset, date_tag: int, shift: Shift, carried: Carried | None) -> tuple[int, ...]:
    """The days the paired TM of ``date_tag`` carries (from its original value), one per value."""
    time_tag = TIME_OF_DATE.get(date_tag)
    if time_tag is None:
        return ()
    if carried is not None and (id(ds), time_tag) in carried:
        return carried[(id(ds), time_tag)]  # the time came first in the walk and is already shifted
    time_elem = ds.get_item(time_tag)
    if time_elem is None:
        return ()
    try:
        return tuple(shift_tm(v, shift.seconds)[1] if v else 0 for v in strings(time_elem))
    except BadValue:
        return ()  # a malformed time fails on its own tag, not on its date's
